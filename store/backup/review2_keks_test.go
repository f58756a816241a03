package backup

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"testing"

	"github.com/kmsd-project/kmsd/hsm"
	"github.com/kmsd-project/kmsd/kms"
)

// kekGen produces a backup file whose versions' sealed blobs each name
// another KEK id of 16 KiB (a blob's KEK id has a 16-bit length).
type kekGen struct {
	buf  bytes.Buffer
	i, n int
}

func (g *kekGen) Read(p []byte) (int, error) {
	for g.buf.Len() == 0 {
		if g.i == 0 {
			g.buf.WriteString(magic)
			h, _ := json.Marshal(Header{Format: Format})
			g.frame('H', h)
		}
		if g.i >= g.n {
			return 0, io.EOF
		}
		g.i++
		id := bytes.Repeat([]byte{'a'}, 16<<10)
		copy(id, fmt.Sprintf("%08x", g.i))
		blob := []byte("KMS1")
		blob = binary.BigEndian.AppendUint16(blob, uint16(len(id)))
		blob = append(blob, id...)
		blob = append(blob, make([]byte, 12)...)
		blob = binary.BigEndian.AppendUint16(blob, 48)
		blob = append(blob, make([]byte, 48+12+16)...)
		b, _ := json.Marshal(versionFrame{Key: "k", Version: &kms.Version{Number: uint64(g.i), Sealed: blob}})
		g.frame('V', b)
	}
	return g.buf.Read(p)
}

func (g *kekGen) frame(t byte, b []byte) {
	g.buf.WriteByte(t)
	var n [4]byte
	binary.BigEndian.PutUint32(n[:], uint32(len(b)))
	g.buf.Write(n[:])
	g.buf.Write(b)
}

// TestReview2KEKsHandlerUnbounded: kmsd restore's first read (before any
// signature is checked) runs backup.KEKs (F10), which keeps every
// distinct KEK id the file's blobs name, each up to 64 KiB, and up to 20
// names for each: memory grows with the file, as F12 was about.
func TestReview2KEKsHandlerUnbounded(t *testing.T) {
	k := &KEKs{BlobKEK: hsm.BlobKEK}
	_, err := Read(&kekGen{n: 4000}, k)
	held := 0
	for id, names := range k.Under {
		held += len(id)
		for _, n := range names {
			held += len(n)
		}
	}
	t.Logf("read: %v; KEK ids kept: %d, %d bytes", err, len(k.Under), held)
	if held > 1<<20 {
		t.Errorf("reading an unsigned file kept %d distinct KEK ids (%d MiB) before refusing it", len(k.Under), held>>20)
	}
}
