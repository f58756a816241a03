package app

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/kmsd-project/kmsd/api/client"
	"github.com/kmsd-project/kmsd/hsm"
	"github.com/kmsd-project/kmsd/internal/testhsm"
	"github.com/kmsd-project/kmsd/kms"
	"github.com/kmsd-project/kmsd/store/bolt"
)

// failRotationWriteOnce is a store whose first write of the rotation
// record fails (a store hiccup: etcd leader change, a full disk, a
// context deadline; or kmsd killed between the claim and the record).
type failRotationWriteOnce struct {
	*bolt.Store
	mu     sync.Mutex
	failed bool
}

func (s *failRotationWriteOnce) PutMeta(key string, value []byte) error {
	s.mu.Lock()
	fail := key == metaRotation && !s.failed
	if fail {
		s.failed = true
	}
	s.mu.Unlock()
	if fail {
		return errors.New("injected: etcdserver: request timed out")
	}
	return s.Store.PutMeta(key, value)
}

// TestReview2RotationClaimWedges: RotateKEK claims kek-rotation-<seq>
// (ClaimMeta) and only then writes the rotation record. If that write
// fails once (or kmsd dies between the two), the claim stays, the record
// still says the previous rotation is done with the previous seq, and
// every later rotate claims the same seq, finds another's value and is
// refused ("another KEK rotation started at the same time") for ever.
// No API call clears it.
func TestReview2RotationClaimWedges(t *testing.T) {
	ctx := context.Background()
	label := "review2-cw-" + reviewID()[:8]
	a0, sealer, st := reviewApp(t, label)
	a0.Close()
	fs := &failRotationWriteOnce{Store: st}
	a, err := New(ctx, Config{Store: fs, AuditStore: st.Audit(), Sealer: sealer, AdminToken: func(string) error { return nil }, Lead: func(context.Context, string, func(context.Context)) {}})
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	_, err = a.RotateKEK(ctx, reviewAdmin)
	t.Logf("first rotate (the store write fails once): %v", err)
	for i := 0; i < 3; i++ {
		_, err = a.RotateKEK(ctx, reviewAdmin)
		t.Logf("rotate again: %v", err)
		if err == nil {
			return
		}
		time.Sleep(200 * time.Millisecond)
	}
	t.Errorf("after one failed write of the rotation record, every KEK rotation is refused: %v", err)
}

// sharedBolt makes a bolt store say it is shared, as an etcd store does
// (replicas): the rotation's switch grace applies.
type sharedBolt struct{ *bolt.Store }

func (sharedBolt) Shared() bool { return true }

// TestReview2GraceFromStartedAtNotSwitch: on a shared store a rotation is
// done only after a count at least switchGrace after its switch, so that
// a replica that has not followed the ring yet (up to ringEvery) and
// sealed under the old KEK has committed before the count. The grace is
// measured from rot.StartedAt, written when the rotation was requested
// (and by that replica's clock), not from the switch: a rotation whose
// switch came later (NewKEK failed and the rewrap job retried once the
// HSM answered; kmsd killed while "creating") is done within
// milliseconds of its switch. A replica that seals under the old KEK
// right after the switch then commits after a retire that the count
// allowed: the key is lost.
func TestReview2GraceFromStartedAtNotSwitch(t *testing.T) {
	ctx := context.Background()
	label := "review2-gr-" + reviewID()[:8]
	cfg := testhsm.Config(t)
	cfg.KEKLabel = label
	sealerA, err := hsm.Open(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer sealerA.Close()
	old := sealerA.KEKID()
	st, err := bolt.Open(t.TempDir()+"/kms.db", bolt.Options{Sealer: sealerA})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	st.PutMeta("sealed-under", []byte(`{"token":"kmsd-test","label":"`+label+`","id":"`+old+`"}`))
	noLead := func(context.Context, string, func(context.Context)) {}
	a, err := New(ctx, Config{Store: sharedBolt{st}, AuditStore: st.Audit(), Sealer: sealerA, AdminToken: func(string) error { return nil }, Lead: noLead})
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	// Replica B, which follows the ring each second, its Seal of key
	// "slow" taking 1.5 s to commit (well inside switchGrace).
	bcfg := cfg
	bcfg.KEKID, bcfg.CreateKEK = old, false
	hb, err := hsm.Open(bcfg)
	if err != nil {
		t.Fatal(err)
	}
	defer hb.Close()
	sb := slowCommit{Sealer: hb, sealed: make(chan struct{}), once: &sync.Once{}}
	b, err := New(ctx, Config{Store: sharedBolt{st}, AuditStore: st.Audit(), Sealer: sb, AdminToken: func(string) error { return nil }, Lead: noLead})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	// A rotation requested an hour ago whose KEK could not be made then
	// (the HSM did not answer): the rewrap job retries it.
	next := reviewID()
	if _, err := st.ClaimMeta(metaRotation+"-1", []byte(next)); err != nil {
		t.Fatal(err)
	}
	rot := &client.KEKRotation{Seq: 1, State: RotationCreating, From: []string{old}, To: next, StartedAt: time.Now().Add(-time.Hour).UTC(), Error: "HSM: unavailable", By: reviewAdmin.TokenID}
	if err := putJSON(st, metaRotation, rot); err != nil {
		t.Fatal(err)
	}
	b.Start() // B follows the ring each second
	t0 := time.Now()
	rewrapped := make(chan error, 1)
	go func() { rewrapped <- a.rewrapOnce(ctx, sealerA, sharedBolt{st}) }()
	for {
		if p, _, _ := readRing(st); p == next {
			break
		}
		time.Sleep(100 * time.Microsecond)
	}
	// The switch is recorded; B has not followed yet (it does within
	// ringEvery): a key made on B now is sealed under OLD.
	made := make(chan error, 1)
	go func() {
		_, _, err := b.Service.CreateKey(ctx, "slow", "ml-dsa-65", kms.Policy{})
		made <- err
	}()
	<-sb.sealed
	if p, _ := hb.KEKs(); p != old {
		t.Skip("B followed the ring before it sealed; run again")
	}
	if err := <-rewrapped; err != nil {
		t.Fatal(err)
	}
	took := time.Since(t0)
	rot, _ = a.rotation(st)
	t.Logf("the rotation went from its switch to %s in %v (switchGrace %v)", rot.State, took, switchGrace)
	_, rerr := a.RetireKEK(ctx, reviewAdmin, old)
	t.Logf("retire %s on A: %v", old, rerr)
	if err := <-made; err != nil {
		t.Fatalf("create on B: %v", err)
	}
	if rot.State == RotationDone && took < switchGrace {
		t.Errorf("a rotation on a shared store was done %v after its switch (< switchGrace %v): its grace ran from StartedAt", took, switchGrace)
	}
	if rerr == nil {
		if _, _, err := a.Service.Sign(ctx, "slow", []byte("m"), nil); err != nil {
			t.Errorf("key 'slow', made on replica B within a second of the switch, is sealed under the KEK retired on A: %v", err)
		}
	}
}

// barrierRing holds NewKEK until both replicas have called it: the two
// calls then reach the token together, as they do when the elected
// replica's rewrap job (every 5 s) finds the rotation "creating" while
// the replica that took the request is still making the KEK.
type barrierRing struct {
	*hsm.Sealer
	wg *sync.WaitGroup
}

func (b barrierRing) NewKEK(ctx context.Context, id string) error {
	b.wg.Done()
	// Both at once if both make it; since the fix only the claimant
	// does, and it goes on after a while.
	waited := make(chan struct{})
	go func() { b.wg.Wait(); close(waited) }()
	select {
	case <-waited:
	case <-time.After(2 * time.Second):
	}
	return b.Sealer.NewKEK(ctx, id)
}

// TestReview2RotationAdvancedTwice: the claim (F6) keeps two rotations
// apart, but one rotation is still advanced by two processes at once:
// RotateKEK on replica R1 (advanceKEK under R1's kek.mu) and the elected
// replica R2's rewrap job (advanceKEK for a rotation it finds
// "creating", under R2's kek.mu). Both call NewKEK(to), which finds no
// KEK with that id and makes one: the token ends with two different
// KEKs under one label and id. Each replica seals under its own; no
// process can find the primary any more (findSet: "more than one key").
func TestReview2RotationAdvancedTwice(t *testing.T) {
	ctx := context.Background()
	label := "review2-tw-" + reviewID()[:8]
	cfg := testhsm.Config(t)
	cfg.KEKLabel = label
	h1, err := hsm.Open(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer h1.Close()
	old := h1.KEKID()
	bcfg := cfg
	bcfg.KEKID, bcfg.CreateKEK = old, false
	h2, err := hsm.Open(bcfg)
	if err != nil {
		t.Fatal(err)
	}
	defer h2.Close()
	st, err := bolt.Open(t.TempDir()+"/kms.db", bolt.Options{Sealer: h1})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	st.PutMeta("sealed-under", []byte(`{"token":"kmsd-test","label":"`+label+`","id":"`+old+`"}`))
	wg := &sync.WaitGroup{}
	wg.Add(2)
	defer func() { recover() }() // a Done past zero, should both ever call it
	noLead := func(context.Context, string, func(context.Context)) {}
	r1, err := New(ctx, Config{Store: sharedBolt{st}, AuditStore: st.Audit(), Sealer: barrierRing{h1, wg}, AdminToken: func(string) error { return nil }, Lead: noLead})
	if err != nil {
		t.Fatal(err)
	}
	defer r1.Close()
	r2, err := New(ctx, Config{Store: sharedBolt{st}, AuditStore: st.Audit(), Sealer: barrierRing{h2, wg}, AdminToken: func(string) error { return nil }, Lead: noLead})
	if err != nil {
		t.Fatal(err)
	}
	defer r2.Close()
	done := make(chan error, 1)
	go func() { _, err := r1.RotateKEK(ctx, reviewAdmin); done <- err }()
	// R2's rewrap job wakes while the rotation is "creating".
	for {
		if rot, _ := r2.rotation(st); rot != nil && rot.State == RotationCreating {
			break
		}
		time.Sleep(100 * time.Microsecond)
	}
	rctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	rerr := r2.rewrapOnce(rctx, barrierRing{h2, wg}, sharedBolt{st})
	cancel()
	t.Logf("R1 rotate: %v; R2 rewrap: %v", <-done, rerr)
	primary, _, _ := readRing(st)
	fcfg := cfg
	fcfg.KEKID, fcfg.CreateKEK = primary, false
	f, err := hsm.Open(fcfg)
	if err != nil {
		t.Errorf("after one rotation advanced by two replicas, a kmsd (re)started on the store cannot open its primary KEK %s: %v", primary, err)
		return
	}
	f.Close()
}

// slowList is a store whose range reads take a round trip (etcd: each
// key's versions are one request).
type slowList struct{ *bolt.Store }

func (s slowList) ListVersions(ctx context.Context, name string, before uint64, limit int) (*kms.Key, []*kms.Version, error) {
	time.Sleep(5 * time.Millisecond)
	return s.Store.ListVersions(ctx, name, before, limit)
}

// TestReview2FenceBlocksCreatesForWholeCount: the F4 fence is held for a
// whole SealedUnder count (a read of every version of every key), after
// every rewrap pass and for every retire: no key can be created or
// rotated in this process meanwhile, and the wait ignores the request's
// context (enter takes a plain mutex). On a store of many keys (etcd: a
// request per key) that is minutes of stalled writes, repeated each pass.
func TestReview2FenceBlocksCreatesForWholeCount(t *testing.T) {
	ctx := context.Background()
	label := "review2-fb-" + reviewID()[:8]
	a0, sealer, st := reviewApp(t, label)
	for i := 0; i < 400; i++ {
		if _, _, err := a0.Service.CreateKey(ctx, fmt.Sprintf("k%04d", i), "ml-dsa-65", kms.Policy{}); err != nil {
			t.Fatal(err)
		}
	}
	a0.Close()
	a, err := New(ctx, Config{Store: slowList{st}, AuditStore: st.Audit(), Sealer: sealer, AdminToken: func(string) error { return nil }, Lead: func(context.Context, string, func(context.Context)) {}})
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	counted := make(chan error, 1)
	go func() {
		_, err := a.KEKStatus(ctx, reviewAdmin, false)
		if err == nil {
			// As a retire and a rewrap pass count now: a drain, then
			// the count outside it.
			if err = a.Service.DrainSeals(ctx); err == nil {
				_, err = a.Service.SealedUnder(ctx)
			}
		}
		counted <- err
	}()
	time.Sleep(50 * time.Millisecond) // the count (a retire's, a pass's) is under way
	rctx, cancel := context.WithTimeout(ctx, 200*time.Millisecond)
	defer cancel()
	t0 := time.Now()
	_, _, err = a.Service.CreateKey(rctx, "during-the-count", "ml-dsa-65", kms.Policy{})
	took := time.Since(t0)
	t.Logf("a key created during the count: %v after %v (its context allowed 200ms); count: %v", err, took, <-counted)
	if took > time.Second {
		t.Errorf("creating a key waited %v for a KEK count of 400 keys to end (the request's 200 ms deadline ignored)", took.Round(time.Millisecond))
	}
}

// TestReview2StartsWithSecretsUnderMissingKEK: the F5 fix drops a KEK of
// the ring that the token does not hold, when connecting and when
// following the ring, at start too (New's followRing). It is meant for a
// KEK retired meanwhile, but nothing checks that nothing is sealed under
// it: a data dir whose store still holds secrets under a KEK the token
// lost (destroyed outside kmsd, an HSM partner it was never replicated
// to, a rotation not finished) now starts with a log line, where it used
// to refuse ("KEK ... of the ring: key missing"); the keys fail at use.
func TestReview2StartsWithSecretsUnderMissingKEK(t *testing.T) {
	ctx := context.Background()
	label := "review2-ms-" + reviewID()[:8]
	a, sealer, st := reviewApp(t, label)
	old := sealer.KEKID()
	if _, _, err := a.Service.CreateKey(ctx, "payments", "ml-dsa-65", kms.Policy{}); err != nil {
		t.Fatal(err)
	}
	if _, err := a.RotateKEK(ctx, reviewAdmin); err != nil { // not rewrapped yet
		t.Fatal(err)
	}
	a.Close()
	// OLD is lost from the token outside kmsd.
	if err := sealer.DestroyKEK(ctx, old); err != nil {
		t.Fatal(err)
	}
	counts, _ := a.Service.SealedUnder(ctx)
	b, err := New(ctx, Config{Store: st, AuditStore: st.Audit(), Sealer: sealer, AdminToken: func(string) error { return nil }, Lead: func(context.Context, string, func(context.Context)) {}})
	if err == nil {
		defer b.Close()
		_, _, serr := b.Service.Sign(ctx, "payments", []byte("m"), nil)
		t.Errorf("kmsd started on a store with %d secrets under KEK %s, which the token does not hold (sign: %v)", counts[old], old, serr)
		return
	}
	t.Logf("start refused: %v", err)
}
