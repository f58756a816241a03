package bolt_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"path/filepath"
	"strings"
	"testing"

	bbolt "go.etcd.io/bbolt"

	"github.com/kmsd-project/kmsd/internal/testhsm"
	"github.com/kmsd-project/kmsd/kms"
	"github.com/kmsd-project/kmsd/store/bolt"
	"github.com/kmsd-project/kmsd/store/internal/storekit"
)

func versionKey(name string, n uint64) []byte {
	return binary.BigEndian.AppendUint64(append([]byte(name), 0), n)
}

// raw runs fn on the closed file, as whoever can write the data dir.
func raw(t *testing.T, path string, fn func(tx *bbolt.Tx) error) {
	t.Helper()
	db, err := bbolt.Open(path, 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	if err := db.Update(fn); err != nil {
		t.Fatal(err)
	}
}

func get(t *testing.T, path string, bucket string, key []byte) []byte {
	var v []byte
	db, err := bbolt.Open(path, 0o600, &bbolt.Options{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	db.View(func(tx *bbolt.Tx) error { v = bytes.Clone(tx.Bucket([]byte(bucket)).Get(key)); return nil })
	return v
}

// TestStoreWriterCannotForgeOrRollBack does to the file what the review
// did to etcd: whoever can write the data dir edits records, invents
// one, puts an earlier authentic one back or deletes one. Each is refused
// at the next start, naming the record, and nothing is acted on.
func TestStoreWriterCannotForgeOrRollBack(t *testing.T) {
	ctx := context.Background()
	sealer := testhsm.Open(t)
	setup := func(t *testing.T) (string, []byte) {
		path := filepath.Join(t.TempDir(), "kms.db")
		s, err := bolt.Open(path, bolt.Options{Sealer: sealer})
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close()
		if err := s.CreateKey(ctx, &kms.Key{Name: "k", Primary: 1, Latest: 1}, &kms.Version{Number: 1, State: kms.StateEnabled, Sealed: []byte("x")}, nil); err != nil {
			t.Fatal(err)
		}
		if err := s.CreateToken(ctx, &kms.Token{ID: "admin1", Role: "admin", Hash: []byte("h")}, nil); err != nil {
			t.Fatal(err)
		}
		s.Close()
		enabled := get(t, path, "versions", versionKey("k", 1))
		s, err = bolt.Open(path, bolt.Options{Sealer: sealer})
		if err != nil {
			t.Fatal(err)
		}
		err = s.UpdateKey(ctx, "k", func(tx kms.KeyTx) ([]*kms.AuditRecord, error) {
			v, err := tx.Version(1)
			v.State = kms.StateDisabled
			return nil, err
		})
		if err != nil {
			t.Fatal(err)
		}
		s.Close()
		return path, enabled
	}
	for _, c := range []struct {
		name, want string
		edit       func(tx *bbolt.Tx, enabled []byte) error
	}{
		{"a token record invented", "tokens/forged", func(tx *bbolt.Tx, _ []byte) error {
			return tx.Bucket([]byte("tokens")).Put([]byte("forged"), []byte(`{"id":"forged","role":"admin","keys":["*"],"hash":"00"}`))
		}},
		{"a token's role edited", "tokens/admin1", func(tx *bbolt.Tx, _ []byte) error {
			b := tx.Bucket([]byte("tokens"))
			v := bytes.Clone(b.Get([]byte("admin1")))
			return b.Put([]byte("admin1"), bytes.Replace(v, []byte(`"admin"`), []byte(`"admix"`), 1))
		}},
		{"a version's state edited", "versions/k", func(tx *bbolt.Tx, _ []byte) error {
			b := tx.Bucket([]byte("versions"))
			v := bytes.Clone(b.Get(versionKey("k", 1)))
			return b.Put(versionKey("k", 1), bytes.Replace(v, []byte(`"disabled"`), []byte(`"enabled" `), 1))
		}},
		{"a record moved to another path", "tokens/admin2", func(tx *bbolt.Tx, _ []byte) error {
			b := tx.Bucket([]byte("tokens"))
			return b.Put([]byte("admin2"), bytes.Clone(b.Get([]byte("admin1"))))
		}},
		{"an earlier authentic version record put back", "digest", func(tx *bbolt.Tx, enabled []byte) error {
			return tx.Bucket([]byte("versions")).Put(versionKey("k", 1), enabled)
		}},
		{"a token deleted", "digest", func(tx *bbolt.Tx, _ []byte) error {
			return tx.Bucket([]byte("tokens")).Delete([]byte("admin1"))
		}},
		{"the store digest deleted", "digest is missing", func(tx *bbolt.Tx, _ []byte) error {
			return tx.Bucket([]byte("meta")).Delete([]byte("digest"))
		}},
		{"the record key deleted", "record key is missing", func(tx *bbolt.Tx, _ []byte) error {
			return tx.Bucket([]byte("meta")).Delete([]byte("record-key"))
		}},
		{"the schema rolled back to before tags", "schema was rolled back", func(tx *bbolt.Tx, _ []byte) error {
			return tx.Bucket([]byte("meta")).Put([]byte("schema"), []byte("2"))
		}},
	} {
		t.Run(c.name, func(t *testing.T) {
			path, enabled := setup(t)
			// The file is edited while kmsd is down.
			raw(t, path, func(tx *bbolt.Tx) error { return c.edit(tx, enabled) })
			_, err := bolt.Open(path, bolt.Options{Sealer: sealer})
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("open after the edit: %v, want an error naming %q", err, c.want)
			}
		})
	}
}

// TestTamperWhileRunning: a record edited while the store is open (bbolt's
// lock is advisory) is refused when read, as a tamper error naming it, and
// a scrub finds the store broken: from then on every record is refused.
func TestTamperWhileRunning(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "kms.db")
	s, err := bolt.Open(path, bolt.Options{Sealer: testhsm.Open(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	for _, id := range []string{"a", "b"} {
		if err := s.CreateToken(ctx, &kms.Token{ID: id, Role: "reader", Hash: []byte("h")}, nil); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.EditForTest(func(tx *bbolt.Tx) error {
		return tx.Bucket([]byte("tokens")).Put([]byte("a"), []byte(`{"id":"a","role":"admin","hash":"h"}`))
	}); err != nil {
		t.Fatal(err)
	}
	_, err = s.GetToken(ctx, "a")
	var te *kms.TamperError
	if !errors.As(err, &te) || te.Path != "tokens/a" || !errors.Is(err, kms.ErrInternal) {
		t.Fatalf("forged token read: %v", err)
	}
	if _, err := s.GetToken(ctx, "b"); err != nil {
		t.Fatalf("an untouched token: %v", err)
	}
	if _, err := s.Scrub(ctx); storekit.AsTamper(err) == nil {
		t.Fatalf("scrub: %v", err)
	}
	if _, err := s.GetToken(ctx, "b"); storekit.AsTamper(err) == nil {
		t.Fatalf("after a failed scrub, an untouched token: %v", err)
	}
	if in := s.Integrity(); in.Broken == nil || in.Tampered < 2 || in.LastError == "" {
		t.Fatalf("integrity: %+v", in)
	}
}

// TestForgedUntaggedFileRefused is the outside review's attack: whoever can
// write the data dir strips the file of its schema, record key, digest and
// every tag, and adds an admin token. kmsd took it for a new file and
// tagged everything; now a file with records and no record key is refused
// unless the operator asks for the upgrade.
func TestForgedUntaggedFileRefused(t *testing.T) {
	path := filepath.Join(t.TempDir(), "kms.db")
	raw(t, path, func(tx *bbolt.Tx) error {
		b, err := tx.CreateBucket([]byte("tokens"))
		if err != nil {
			return err
		}
		return b.Put([]byte("0000000000000001"), []byte(`{"id":"0000000000000001","role":"admin","keys":["*"],"hash":"AAAA"}`))
	})
	if _, err := bolt.Open(path, bolt.Options{Sealer: testhsm.Open(t)}); !errors.Is(err, bolt.ErrUntagged) {
		t.Fatalf("open of a file of untagged records: %v", err)
	}
}

// TestAuditTruncationFound: rows cut off the end of the audit log (with
// the WAL zeroed) are found at the next start: the log's end is a
// digested record written with the rows.
func TestAuditTruncationFound(t *testing.T) {
	ctx := context.Background()
	sealer := testhsm.Open(t)
	path := filepath.Join(t.TempDir(), "kms.db")
	s, err := bolt.Open(path, bolt.Options{Sealer: sealer})
	if err != nil {
		t.Fatal(err)
	}
	for range 5 {
		if err := s.Audit().AppendAudit(ctx, &kms.AuditRecord{Time: "2026-12-07T00:00:00Z", Actor: "a", Operation: "op", Status: 200}); err != nil {
			t.Fatal(err)
		}
	}
	s.Close()
	raw(t, path, func(tx *bbolt.Tx) error {
		c := tx.Bucket([]byte("audit_records")).Cursor()
		k, _ := c.Last()
		return tx.Bucket([]byte("audit_records")).Delete(bytes.Clone(k))
	})
	if _, err := bolt.Open(path, bolt.Options{Sealer: sealer}); err == nil || !strings.Contains(err.Error(), "audit-end") {
		t.Fatalf("open of a log cut short: %v", err)
	}
}

// TestMalformedRowKeyRefused: a row key that is not 8 bytes is an error
// at start, not a panic.
func TestMalformedRowKeyRefused(t *testing.T) {
	sealer := testhsm.Open(t)
	path := filepath.Join(t.TempDir(), "kms.db")
	s, err := bolt.Open(path, bolt.Options{Sealer: sealer})
	if err != nil {
		t.Fatal(err)
	}
	s.Close()
	raw(t, path, func(tx *bbolt.Tx) error { return tx.Bucket([]byte("audit_records")).Put([]byte{0xff}, []byte("x")) })
	if _, err := bolt.Open(path, bolt.Options{Sealer: sealer}); err == nil {
		t.Fatal("opened a file with a malformed audit row key")
	}
}
