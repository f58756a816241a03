package bolt_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/kmsd-project/kmsd/internal/testhsm"
	"github.com/kmsd-project/kmsd/kms"
	"github.com/kmsd-project/kmsd/store"
	"github.com/kmsd-project/kmsd/store/bolt"
	"github.com/kmsd-project/kmsd/store/storetest"
)

// spoolTamperer is whoever can write the data dir (the threat model's
// store writer): while the backup is being sent on from the spool file,
// it rewrites the part of .dump-spool-* not read yet. Here it does so the
// first time the backup's sink is called (the HTTP client reading).
type spoolTamperer struct {
	storetest.Recording
	t      *testing.T
	dir    string
	secret []byte
	done   bool
}

func (s *spoolTamperer) Meta(name string, value []byte) error {
	if !s.done {
		s.done = true
		s.tamper()
	}
	return s.Recording.Meta(name, value)
}

func (s *spoolTamperer) tamper() {
	// The spool is unlinked at once: no path in the data dir leads to
	// it. Whoever runs as kmsd still reaches it through /proc.
	if names, _ := filepath.Glob(filepath.Join(s.dir, ".dump-spool-*")); len(names) != 0 {
		s.t.Fatalf("a spool file has a path in the data dir: %v", names)
	}
	var names []string
	fds, _ := filepath.Glob("/proc/self/fd/*")
	for _, fd := range fds {
		if target, err := os.Readlink(fd); err == nil && strings.Contains(target, ".dump-spool-") {
			names = append(names, fd)
		}
	}
	if len(names) != 1 {
		s.t.Fatalf("spool files open: %v", names)
	}
	b, err := os.ReadFile(names[0])
	if err != nil {
		s.t.Fatal(err)
	}
	// Walk the spool's frames (kind, 4-byte length, JSON) to the token.
	for off := 0; off+5 <= len(b); {
		n := int(binary.BigEndian.Uint32(b[off+1 : off+5]))
		if b[off] == 'T' {
			var tok kms.Token
			if err := json.Unmarshal(b[off+5:off+5+n], &tok); err != nil {
				s.t.Fatal(err)
			}
			h := sha256.Sum256(s.secret)
			tok.Role, tok.Keys, tok.Hash = kms.RoleAdmin, []string{"*"}, h[:]
			nb, _ := json.Marshal(&tok)
			var hd [5]byte
			hd[0] = 'T'
			binary.BigEndian.PutUint32(hd[1:], uint32(len(nb)))
			tail := append(append(hd[:], nb...), b[off+5+n:]...)
			f, err := os.OpenFile(names[0], os.O_WRONLY, 0)
			if err != nil {
				s.t.Fatal(err)
			}
			if _, err := f.WriteAt(tail, int64(off)); err != nil {
				s.t.Fatal(err)
			}
			f.Close()
			s.t.Logf("rewrote the spool's token record at offset %d (of %d bytes) into an admin over * with a hash of the attacker's choosing", off, len(b))
			return
		}
		off += 5 + n
	}
	s.t.Fatal("no token in the spool")
}

// TestReview2SpoolForgesSignedBackup (an outside review's finding, now a
// regression test: the spool is unlinked and its content checked against
// a hash kept in memory, and a dump whose spool changed fails, so nothing
// is signed). The F9 fix spooled the dump's read
// transaction into .dump-spool-* beside kms.db, untagged, and then sends
// what the file holds on to the backup writer, which signs it. Nothing
// checks that what is read back is what was written: whoever can write
// the data dir (the store writer F8 is about) rewrites the records not
// yet sent (the backup is sent at the client's pace) and kmsd signs a
// backup with a token of their making. Restoring that backup (the
// runbook's answer to a store found tampered with) gives them an admin
// token over "*".
func TestReview2SpoolForgesSignedBackup(t *testing.T) {
	ctx := context.Background()
	sealer := testhsm.Open(t)
	dir := t.TempDir()
	s, err := bolt.Open(filepath.Join(dir, "kms.db"), bolt.Options{Sealer: sealer})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	// A store of a few MiB: the token is past what the spool's reader
	// has buffered when the sink is first called.
	if err := s.PutMeta("a-padding-1", bytes.Repeat([]byte("p"), 3<<20)); err != nil {
		t.Fatal(err)
	}
	if err := s.PutMeta("a-padding-2", bytes.Repeat([]byte("q"), 3<<20)); err != nil {
		t.Fatal(err)
	}
	if err := s.CreateToken(ctx, &kms.Token{ID: "0123456789abcdef", Name: "ci", Role: kms.RoleWorker, Keys: []string{"ci-*"}, Hash: []byte("h")}, nil); err != nil {
		t.Fatal(err)
	}
	sink := &spoolTamperer{t: t, dir: dir, secret: []byte("attacker's secret")}
	if err := s.Dump(ctx, sink); err == nil || !strings.Contains(err.Error(), "spool file was changed") {
		t.Fatalf("a dump whose spool was changed while it was sent: %v", err)
	}
	if !sink.done {
		t.Fatal("the spool was not tampered with")
	}
	// What the backup writer got must not be signed: the dump failed.
	// Below, what a load of it would hold, for the record.
	// What the backup writer got (and would sign).
	r := store.Backend(nil)
	d, _ := store.Lookup("bolt")
	c, err := d.Connect(store.Config{DataDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	if err := c.(store.Loader).Load(ctx, sealer, sink.Recording.Replay, nil); err != nil {
		t.Fatal(err)
	}
	if r, err = c.Open(sealer); err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	got, err := r.GetToken(ctx, "0123456789abcdef")
	if err != nil {
		t.Fatal(err)
	}
	orig, _ := s.GetToken(ctx, "0123456789abcdef")
	if got.Role != orig.Role || !bytes.Equal(got.Hash, orig.Hash) {
		t.Logf("the dump sent a token the store does not hold: the store has %s over %v, the backup (and the store restored from it) %s over %v with the attacker's hash", orig.Role, orig.Keys, got.Role, got.Keys)
	}
}
