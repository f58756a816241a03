package backup

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"io"
	"runtime"
	"testing"

	"github.com/kmsd-project/kmsd/kms"
)

// frameGen produces a backup file on the fly: the header, then n frames
// of the identity key's versions with distinct numbers, each holding a
// 1 MiB "public key"; no trailer (the file is refused in the end).
type frameGen struct {
	buf    bytes.Buffer
	i, n   int
	pub    []byte
	peak   uint64
	sample func() uint64
}

func (g *frameGen) Read(p []byte) (int, error) {
	for g.buf.Len() == 0 {
		if g.i == 0 {
			g.buf.WriteString(magic)
			h, _ := json.Marshal(Header{Format: Format})
			g.frame('H', h)
		}
		if g.i >= g.n {
			if m := g.sample(); m > g.peak {
				g.peak = m
			}
			return 0, io.EOF
		}
		g.i++
		b, _ := json.Marshal(versionFrame{Key: kms.IdentityKeyName, Version: &kms.Version{Number: uint64(g.i), PublicKey: g.pub}})
		g.frame('V', b)
	}
	return g.buf.Read(p)
}

func (g *frameGen) frame(t byte, b []byte) {
	g.buf.WriteByte(t)
	var n [4]byte
	binary.BigEndian.PutUint32(n[:], uint32(len(b)))
	g.buf.Write(n[:])
	g.buf.Write(b)
}

// TestReviewReadRetainsEveryIdentityVersion: Read keeps every identity
// version a file lists (File.Identity) until the trailer, before any
// signature is checked: a file of many such frames makes kmsd restore and
// kmsctl backup verify hold all of them in memory (frames are bounded to
// 64 MiB, their count is not).
func TestReviewReadRetainsEveryIdentityVersion(t *testing.T) {
	runtime.GC()
	var base runtime.MemStats
	runtime.ReadMemStats(&base)
	g := &frameGen{n: 256, pub: bytes.Repeat([]byte{7}, 1<<20), sample: func() uint64 {
		var m runtime.MemStats
		runtime.ReadMemStats(&m)
		return m.HeapAlloc
	}}
	_, err := Read(g, Discard{})
	if err == nil {
		t.Fatal("a file without trailer accepted")
	}
	grew := int64(g.peak) - int64(base.HeapAlloc)
	t.Logf("read %d identity frames of 1 MiB: %v; heap grew by %d MiB before the file was refused", g.n, err, grew>>20)
	if grew > 64<<20 {
		t.Errorf("Read held %d MiB for a file it then refused: memory grows with the count of identity frames, unbounded", grew>>20)
	}
}
