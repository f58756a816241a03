package etcd

import (
	"context"
	"testing"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/kmsd-project/kmsd/kms"
)

// SetBeforeCommit runs f as every transaction of a state change is sent,
// for one test.
func SetBeforeCommit(t *testing.T, f func()) {
	testHookBeforeCommit = f
	t.Cleanup(func() { testHookBeforeCommit = nil })
}

// SetTxn sends every transaction through f for one test (see
// testHookTxn).
func SetTxn(t *testing.T, f func(ctx context.Context, send func(context.Context) (*clientv3.TxnResponse, error)) (*clientv3.TxnResponse, error)) {
	if f == nil {
		testHookTxn.Store(nil)
	} else {
		testHookTxn.Store(&f)
	}
	t.Cleanup(func() { testHookTxn.Store(nil) })
}

// SealRounds counts the seal transactions s committed.
func (s *Store) SealRounds() uint64 { return s.seal.rounds.Load() }

// Pending counts the audit groups waiting to be sealed.
func (s *Store) Pending(ctx context.Context) (int64, error) {
	resp, err := s.get(ctx, s.pendingPrefix(), clientv3.WithPrefix(), clientv3.WithCountOnly())
	if err != nil {
		return 0, err
	}
	return resp.Count, nil
}

// StopSealing stops this store's sealing of pending audit groups.
func (s *Store) StopSealing() { s.stopSealing(); s.seal.cancel = nil }

// PutPendingForTest writes a pending audit group at P+rel, as a writer
// (now dead) with that name would have.
func (s *Store) PutPendingForTest(ctx context.Context, rel string, recs []*kms.AuditRecord) error {
	w := s.wtx()
	if err := w.put(s.p+rel, nil, []byte(encodePending(recs))); err != nil {
		return err
	}
	return s.commit(ctx, w, nil)
}
