package etcd_test

import (
	"context"
	"errors"
	"github.com/kmsd-project/kmsd/internal/testetcd"
	"github.com/kmsd-project/kmsd/internal/testhsm"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/kmsd-project/kmsd/kms"
	"github.com/kmsd-project/kmsd/store/etcd"
)

var errLost = errors.New("injected: the connection broke with the transaction sent")

// TestUnknownOutcomeIsResolved is issue 24's third defect: a transaction
// whose call fails (an etcd leader killed, a timeout) may still be
// applied afterwards, by the new leader. kmsd read its shard once, saw
// nothing yet and answered the change failed (503, and a second audit
// record for the request), and the change then committed. Here the call
// fails and the transaction is sent late: either the store says it
// committed and it did, or it says it failed and it never applies.
func TestUnknownOutcomeIsResolved(t *testing.T) {
	s := open(t, newPrefix(t))
	if err := s.CreateKey(ctx, &kms.Key{Name: "k", Kind: "ml-dsa-65", Primary: 1, Latest: 1}, &kms.Version{Number: 1, State: kms.StateEnabled}, []*kms.AuditRecord{rec("create")}); err != nil {
		t.Fatal(err)
	}
	for _, delay := range []time.Duration{0, 300 * time.Millisecond} {
		var late sync.WaitGroup
		var armed atomic.Bool
		armed.Store(true)
		etcd.SetTxn(t, func(ctx context.Context, send func(context.Context) (*clientv3.TxnResponse, error)) (*clientv3.TxnResponse, error) {
			if !armed.CompareAndSwap(true, false) {
				return send(ctx)
			}
			if delay == 0 {
				// Applied, and the answer lost.
				if _, err := send(ctx); err != nil {
					t.Error(err)
				}
				return nil, errLost
			}
			// Not applied yet: the new leader applies it later (a
			// proposal in Raft does not end with the client's call).
			late.Add(1)
			go func() {
				defer late.Done()
				time.Sleep(delay)
				resp, err := send(context.Background())
				t.Logf("the late transaction: %v %v", resp != nil && resp.Succeeded, err)
			}()
			return nil, errLost
		})
		before, err := s.GetKey(ctx, "k")
		if err != nil {
			t.Fatal(err)
		}
		_, rerr := rotate(s, "k", "rotate")
		late.Wait()
		etcd.SetTxn(t, nil)
		after, err := s.GetKey(ctx, "k")
		if err != nil {
			t.Fatal(err)
		}
		committed := after.Latest == before.Latest+1
		switch {
		case rerr == nil && !committed:
			t.Fatalf("delay %v: the rotation was answered done and is not in the store", delay)
		case rerr != nil && committed:
			t.Fatalf("delay %v: the rotation was answered failed (%v) and committed", delay, rerr)
		case rerr != nil && !errors.Is(rerr, errLost):
			t.Fatalf("delay %v: %v", delay, rerr)
		}
		t.Logf("delay %v: committed %v, answered %v", delay, committed, rerr)
	}
	// The store goes on: the shard the fence moved is taken as it is.
	if _, err := rotate(s, "k", "again"); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Scrub(ctx); err != nil {
		t.Fatal(err)
	}
}

// TestLateUnknownThenAmbiguous (from an outside review): a commit
// answered outcome-unknown (etcd stopped answering) that applies later,
// then a second commit whose answer is lost. The second's resolution saw
// the shard moved by the first and called it tampering (a 500
// store-tampered and the store broken, with nothing tampered). Now the
// first is settled before the second is sent.
func TestLateUnknownThenAmbiguous(t *testing.T) {
	c := testetcd.Start(t, 1)
	cli, err := clientv3.New(etcd.ClientConfig(c.Endpoints(), nil))
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	s, err := etcd.Open(context.Background(), cli, etcd.Options{Prefix: "/late/", Sealer: testhsm.Open(t), RequestTimeout: 500 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	s.StopSealing()
	if err := s.CreateKey(ctx, &kms.Key{Name: "k", Kind: "ml-dsa-65", Primary: 1, Latest: 1}, &kms.Version{Number: 1, State: kms.StateEnabled}, []*kms.AuditRecord{rec("create")}); err != nil {
		t.Fatal(err)
	}
	old := etcd.ResolveBudget
	etcd.ResolveBudget = time.Second
	defer func() { etcd.ResolveBudget = old }()
	resume := make(chan struct{})
	var late sync.WaitGroup
	var calls atomic.Int32
	etcd.SetTxn(t, func(ctx context.Context, send func(context.Context) (*clientv3.TxnResponse, error)) (*clientv3.TxnResponse, error) {
		switch calls.Add(1) {
		case 1: // A: etcd stops answering; A is applied later
			c.Signal(0, syscall.SIGSTOP)
			late.Add(1)
			go func() {
				defer late.Done()
				<-resume
				send(context.Background())
			}()
			return nil, errLost
		case 2: // B: sent, its answer lost
			send(ctx)
			return nil, errLost
		}
		return send(ctx)
	})
	_, errA := rotate(s, "k", "A")
	if !errors.Is(errA, kms.ErrOutcomeUnknown) {
		t.Fatalf("A: %v, want outcome unknown", errA)
	}
	c.Signal(0, syscall.SIGCONT)
	close(resume)
	late.Wait()
	_, errB := rotate(s, "k", "B")
	k, err := s.GetKey(ctx, "k")
	var te *kms.TamperError
	if errors.As(errB, &te) || errors.As(err, &te) {
		t.Fatalf("a false tamper finding: %v / %v", errB, err)
	}
	if err != nil {
		t.Fatal(err)
	}
	// A applied late (version 2); B either committed on top of it
	// (version 3, answered done) or did not (answered failed).
	switch {
	case errB == nil && k.Latest != 3, errB != nil && k.Latest != 2:
		t.Fatalf("B answered %v, latest version %d", errB, k.Latest)
	}
	if _, err := s.Scrub(ctx); err != nil {
		t.Fatal(err)
	}
}
