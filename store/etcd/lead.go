package etcd

import (
	"context"
	"fmt"
	"os"
	"time"

	"go.etcd.io/etcd/client/v3/concurrency"
)

// LeaseTTL is how long a leader's lease outlives the leader: another
// replica takes over at most this long after a leader dies.
const LeaseTTL = 5 // seconds

// Lead runs work while this replica is elected for role (an etcd election
// under the prefix), until ctx ends: work's context ends when the
// leadership is lost (the lease expired: etcd unreachable), and the
// replica campaigns again. Checkpoint signing and scheduled destruction
// run this way, on one replica at a time.
func (s *Store) Lead(ctx context.Context, role string, work func(context.Context)) {
	host, _ := os.Hostname()
	id := fmt.Sprintf("%s-%d", host, os.Getpid())
	for ctx.Err() == nil {
		sess, err := concurrency.NewSession(s.cli, concurrency.WithTTL(LeaseTTL), concurrency.WithContext(ctx))
		if err != nil {
			s.log.Warn("leader election: no session", "role", role, "err", err)
			sleep(ctx, time.Second)
			continue
		}
		e := concurrency.NewElection(sess, s.p+"lead/"+role)
		// Campaign, cancelled while it waits its turn, resigns under the
		// client's own context, which no timeout bounds: with etcd gone
		// it would hang until the client closes, and kmsd with it on
		// SIGTERM. So the wait ends with ctx, and the campaign is left to
		// end when the client closes.
		campaigned := make(chan error, 1)
		go func() { campaigned <- e.Campaign(ctx, id) }()
		select {
		case err = <-campaigned:
		case <-ctx.Done():
			err = ctx.Err()
		}
		if err != nil {
			if ctx.Err() == nil {
				sess.Close()
			}
			sleep(ctx, time.Second)
			continue
		}
		s.log.Info("leader", "role", role, "id", id)
		lctx, cancel := context.WithCancel(ctx)
		go func() {
			select {
			case <-sess.Done():
				cancel()
			case <-lctx.Done():
			}
		}()
		work(lctx)
		cancel()
		rctx, rcancel := context.WithTimeout(context.Background(), time.Second)
		_ = e.Resign(rctx)
		rcancel()
		sess.Close()
	}
}

func sleep(ctx context.Context, d time.Duration) {
	select {
	case <-ctx.Done():
	case <-time.After(d):
	}
}
