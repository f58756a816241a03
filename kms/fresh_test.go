package kms_test

import (
	"errors"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kmsd-project/kmsd/internal/testhsm"
	"github.com/kmsd-project/kmsd/internal/testutil"
	"github.com/kmsd-project/kmsd/kms"
	"github.com/kmsd-project/kmsd/kms/pqc"
	"github.com/kmsd-project/kmsd/store/bolt"
)

// laggingStore is a store whose change feed can be held back, as a
// replica's etcd watch is while the replica is paused or cut off: the
// changes are delivered later, and FreshWithin says whether the feed is
// current.
type laggingStore struct {
	kms.Store
	lag   atomic.Bool
	mu    sync.Mutex
	fns   []func([]kms.Change)
	held  [][]kms.Change
	fresh atomic.Bool
}

func (l *laggingStore) Watch(fn func([]kms.Change)) {
	l.mu.Lock()
	l.fns = append(l.fns, fn)
	l.mu.Unlock()
	l.Store.Watch(func(chs []kms.Change) {
		if l.lag.Load() {
			l.mu.Lock()
			l.held = append(l.held, chs)
			l.mu.Unlock()
			return
		}
		fn(chs)
	})
}

func (l *laggingStore) FreshWithin(time.Duration) bool { return l.fresh.Load() }

// TestStaleReplicaReadsThrough is issue 24's second defect: a replica
// paused with SIGSTOP and resumed served a disabled version and a revoked
// token from its read cache 3.4 s after the change was acknowledged (the
// cache had no freshness check; the watch noticed its silence only on a
// ticker). Here the change feed is held back: while the store says the
// feed is fresh the cache answers (the feed's own contract); once it says
// it is not, every record is read from the store, and the revocation and
// the disable take effect at once, with the feed still held.
func TestStaleReplicaReadsThrough(t *testing.T) {
	st, err := bolt.Open(filepath.Join(t.TempDir(), "kms.db"), bolt.Options{Sealer: testhsm.Open(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	ls := &laggingStore{Store: st}
	ls.fresh.Store(true)
	svc, err := kms.NewService(kms.Config{Store: ls, Sealer: testhsm.Open(t), Kinds: kms.NewRegistry(pqc.Kinds()...), Clock: testutil.NewClock(time.Now().UTC())})
	if err != nil {
		t.Fatal(err)
	}
	var admin string
	if _, err := svc.EnsureAdminToken(ctx, func(s string) error { admin = s; return nil }); err != nil {
		t.Fatal(err)
	}
	root, err := svc.Authenticate(ctx, admin)
	if err != nil {
		t.Fatal(err)
	}
	tok, info, err := svc.CreateToken(ctx, root, kms.TokenRequest{Role: kms.RoleWorker, Keys: []string{"*"}})
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := svc.CreateKey(ctx, "k", "ml-dsa-65", kms.Policy{}); err != nil {
		t.Fatal(err)
	}
	// Warm the caches.
	if _, err := svc.Authenticate(ctx, tok); err != nil {
		t.Fatal(err)
	}
	if _, _, err := svc.Sign(ctx, "k", []byte("m"), nil); err != nil {
		t.Fatal(err)
	}
	// Another replica revokes the token and disables the version: this
	// replica's feed does not deliver it.
	ls.lag.Store(true)
	if err := st.UpdateToken(ctx, info.ID, func(t *kms.Token) ([]*kms.AuditRecord, error) {
		now := time.Now()
		t.RevokedAt = &now
		return nil, nil
	}); err != nil {
		t.Fatal(err)
	}
	if err := st.UpdateKey(ctx, "k", func(tx kms.KeyTx) ([]*kms.AuditRecord, error) {
		v, err := tx.Version(1)
		if err != nil {
			return nil, err
		}
		v.State = kms.StateDisabled
		return nil, nil
	}); err != nil {
		t.Fatal(err)
	}
	// The feed is stale: the cache must not answer.
	ls.fresh.Store(false)
	if _, err := svc.Authenticate(ctx, tok); err == nil {
		t.Fatal("a revoked token authenticated from a stale cache")
	}
	if _, _, err := svc.Sign(ctx, "k", []byte("m"), nil); err == nil || errors.Is(err, kms.ErrNotFound) {
		t.Fatalf("a disabled version signed from a stale cache: %v", err)
	}
	if svc.Stats().RecordCacheStale == 0 {
		t.Fatal("no read counted as past a stale cache")
	}
}
