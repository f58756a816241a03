package etcd

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"sync"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// Every replica's audit appends compare-and-swap the log's end, so under
// load they race, and a replica that keeps losing would back off longer
// each time while the winners go on: a group that lost 100 times in a row
// is refused (503). A turn makes the race fair: a replica that has lost
// starveAfter appends in a row claims the key a/turn (under a lease of its
// own, so a crash frees it in a few seconds) and appends with the turn
// held, deleting it in the same transaction; while a turn is held, every
// other replica's append compares it absent and waits. A turn lasts one
// attempt: if that fails too, it is released and claimed again later.
type turn struct {
	mu     sync.Mutex
	lost   int              // appends lost in a row
	held   bool             // claimed, not yet consumed or released for sure
	lease  clientv3.LeaseID // 0: none granted yet (or it expired)
	cancel context.CancelFunc
	claims uint64
	id     string // this store instance, in the turn key
}

const (
	starveAfter = 4
	turnTTL     = 3 // seconds
)

func (s *Store) turnK() string { return s.p + "a/turn" }

// guard adds the turn's compares to an append: "no turn held", or, for a
// replica that starved and now holds the turn, "my turn" plus its
// release. release reports whether the transaction committed.
func (t *turn) guard(ctx context.Context, s *Store, cmps []clientv3.Cmp, ops []clientv3.Op) ([]clientv3.Cmp, []clientv3.Op, func(bool), error) {
	t.mu.Lock()
	starving, held := t.lost >= starveAfter, t.held
	t.mu.Unlock()
	if starving && !held {
		var err error
		if held, err = t.claim(ctx, s); err != nil {
			return nil, nil, nil, err
		}
	}
	me := s.turnID()
	if held {
		cmps = append(cmps, clientv3.Compare(clientv3.Value(s.turnK()), "=", me))
		ops = append(ops, clientv3.OpDelete(s.turnK()))
	} else {
		cmps = append(cmps, clientv3.Compare(clientv3.Version(s.turnK()), "=", 0))
	}
	return cmps, ops, func(committed bool) {
		t.mu.Lock()
		if committed {
			t.lost, t.held = 0, false
		} else {
			t.lost++
		}
		t.mu.Unlock()
		if held && !committed {
			// Not consumed: free it for the others at once. If that
			// fails too, the next append still counts it held, and
			// consumes or frees it.
			ctx, cancel := s.ctx(context.Background())
			defer cancel()
			if _, err := s.cli.Txn(ctx).If(clientv3.Compare(clientv3.Value(s.turnK()), "=", me)).Then(clientv3.OpDelete(s.turnK())).Commit(); err == nil {
				t.mu.Lock()
				t.held = false
				t.mu.Unlock()
			}
		}
	}, nil
}

// turnID names this store instance in the turn key.
func (s *Store) turnID() string {
	s.turn.mu.Lock()
	defer s.turn.mu.Unlock()
	if s.turn.id == "" {
		b := make([]byte, 12)
		rand.Read(b)
		s.turn.id = hex.EncodeToString(b)
	}
	return s.turn.id
}

// claim takes the turn if nobody holds it.
func (t *turn) claim(ctx context.Context, s *Store) (bool, error) {
	lease, err := t.leaseID(ctx, s)
	if err != nil {
		return false, err
	}
	tctx, cancel := s.ctx(ctx)
	defer cancel()
	resp, err := s.cli.Txn(tctx).If(clientv3.Compare(clientv3.Version(s.turnK()), "=", 0)).
		Then(clientv3.OpPut(s.turnK(), s.turnID(), clientv3.WithLease(lease))).Commit()
	if errors.Is(err, rpctypes.ErrLeaseNotFound) {
		t.mu.Lock()
		t.dropLease()
		t.mu.Unlock()
		return false, nil // the next starving attempt grants a new one
	}
	if err != nil {
		return false, fmt.Errorf("etcd: %w", err)
	}
	if resp.Succeeded {
		t.mu.Lock()
		t.claims++
		t.held = true
		t.mu.Unlock()
	}
	return resp.Succeeded, nil
}

// leaseID returns the lease turns are held under, granting it (and
// keeping it alive until Close) on first use.
func (t *turn) leaseID(ctx context.Context, s *Store) (clientv3.LeaseID, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.lease != 0 {
		return t.lease, nil
	}
	tctx, cancel := s.ctx(ctx)
	defer cancel()
	g, err := s.cli.Grant(tctx, turnTTL)
	if err != nil {
		return 0, fmt.Errorf("etcd: %w", err)
	}
	kctx, kcancel := context.WithCancel(context.Background())
	ch, err := s.cli.KeepAlive(kctx, g.ID)
	if err != nil {
		kcancel()
		return 0, fmt.Errorf("etcd: %w", err)
	}
	t.lease, t.cancel = g.ID, kcancel
	go func(id clientv3.LeaseID) {
		for range ch {
		}
		// The keepalive ended (Close, or the lease expired): the next
		// claim grants another.
		t.mu.Lock()
		if t.lease == id {
			t.dropLease()
		}
		t.mu.Unlock()
	}(g.ID)
	return t.lease, nil
}

func (t *turn) dropLease() {
	if t.cancel != nil {
		t.cancel()
	}
	t.lease, t.cancel = 0, nil
}

// close revokes the lease, freeing a turn still held; a process that
// dies holding one frees it when the lease expires (turnTTL), and the
// other replicas' appends wait until then.
func (t *turn) close(s *Store) {
	t.mu.Lock()
	lease := t.lease
	t.dropLease()
	t.mu.Unlock()
	if lease != 0 {
		ctx, cancel := s.ctx(context.Background())
		defer cancel()
		_, _ = s.cli.Revoke(ctx, lease)
	}
}

// TurnsClaimed is how many times this store claimed a turn to append
// after losing starveAfter appends in a row.
func (s *Store) TurnsClaimed() uint64 {
	s.turn.mu.Lock()
	defer s.turn.mu.Unlock()
	return s.turn.claims
}
