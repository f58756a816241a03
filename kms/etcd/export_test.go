package etcd

import (
	"context"
	"testing"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// SetBeforeCommit runs f as every transaction of a state change is sent,
// for one test.
func SetBeforeCommit(t *testing.T, f func()) {
	testHookBeforeCommit = f
	t.Cleanup(func() { testHookBeforeCommit = nil })
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
