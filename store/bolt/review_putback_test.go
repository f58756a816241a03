package bolt_test

import (
	"bytes"
	"context"
	"path/filepath"
	"testing"
	"time"

	bbolt "go.etcd.io/bbolt"

	"github.com/kmsd-project/kmsd/internal/testhsm"
	"github.com/kmsd-project/kmsd/kms"
	"github.com/kmsd-project/kmsd/store"
	"github.com/kmsd-project/kmsd/store/bolt"
	"github.com/kmsd-project/kmsd/store/storetest"
)

// TestReviewBackupLaundersPutBackRecord: whoever writes kms.db puts back
// an earlier authentic record (a token from before its revocation) just
// before a scheduled backup. Dump checks each record's tag, not the store
// digest, so the backup holds the put-back record, signed by kmsd; the
// scrub then finds the put-back and breaks the store, the runbook says
// restore the latest backup, and the restored store holds the token
// active, under a new record key and digest that pass every scrub.
func TestReviewBackupLaundersPutBackRecord(t *testing.T) {
	ctx := context.Background()
	sealer := testhsm.Open(t)
	s, err := bolt.Open(filepath.Join(t.TempDir(), "kms.db"), bolt.Options{Sealer: sealer})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if err := s.CreateToken(ctx, &kms.Token{ID: "leaked", Role: "admin", Keys: []string{"*"}, Hash: []byte("h")}, nil); err != nil {
		t.Fatal(err)
	}
	var before []byte
	s.EditForTest(func(tx *bbolt.Tx) error {
		before = bytes.Clone(tx.Bucket([]byte("tokens")).Get([]byte("leaked")))
		return nil
	})
	if err := s.UpdateToken(ctx, "leaked", func(t *kms.Token) ([]*kms.AuditRecord, error) {
		now := time.Now()
		t.RevokedAt = &now
		return nil, nil
	}); err != nil {
		t.Fatal(err)
	}
	// The put-back, behind kmsd's back.
	if err := s.EditForTest(func(tx *bbolt.Tx) error { return tx.Bucket([]byte("tokens")).Put([]byte("leaked"), before) }); err != nil {
		t.Fatal(err)
	}
	// The scheduled backup.
	rec := &storetest.Recording{}
	if err := s.Dump(ctx, rec); err != nil {
		t.Logf("the dump refused the store: %v", err)
		return
	}
	// The next scrub finds it.
	if _, err := s.Scrub(ctx); err == nil {
		t.Fatal("the scrub did not find the put-back")
	} else {
		t.Logf("scrub after the backup: %v", err)
	}
	// Restore the latest backup.
	d, _ := store.Lookup("bolt")
	c, err := d.Connect(store.Config{DataDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	if err := c.(store.Loader).Load(ctx, sealer, rec.Replay, nil); err != nil {
		t.Fatal(err)
	}
	r, err := c.Open(sealer)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if rb, ok := r.(*bolt.Store); ok {
		if _, err := rb.Scrub(ctx); err != nil {
			t.Logf("scrub of the restored store: %v", err)
		} else {
			t.Log("the restored store passes its scrub")
		}
	}
	tok, err := r.GetToken(ctx, "leaked")
	if err != nil {
		t.Fatal(err)
	}
	if tok.RevokedAt == nil {
		t.Errorf("the revoked token is active in the backup taken after a put-back, and in the store restored from it")
	}
}
