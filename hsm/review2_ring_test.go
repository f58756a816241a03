package hsm_test

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	"github.com/miekg/pkcs11"

	"github.com/kmsd-project/kmsd/hsm"
	"github.com/kmsd-project/kmsd/internal/testhsm"
	"github.com/kmsd-project/kmsd/kms"
)

// downModule is a replica's link to the HSM, which can go down: every
// crypto call fails as the device does, and the token cannot be found.
// Logout is never passed on (it would log out the other sealer of this
// test process: a login is per application).
type downModule struct {
	hsm.Module
	down atomic.Bool
}

var errDown = pkcs11.Error(pkcs11.CKR_DEVICE_ERROR)

func (m *downModule) GetSlotList(p bool) ([]uint, error) {
	if m.down.Load() {
		return nil, errDown
	}
	return m.Module.GetSlotList(p)
}
func (m *downModule) Encrypt(sh pkcs11.SessionHandle, b []byte) ([]byte, error) {
	if m.down.Load() {
		return nil, errDown
	}
	return m.Module.Encrypt(sh, b)
}
func (m *downModule) WrapKey(sh pkcs11.SessionHandle, mm []*pkcs11.Mechanism, w, k pkcs11.ObjectHandle) ([]byte, error) {
	if m.down.Load() {
		return nil, errDown
	}
	return m.Module.WrapKey(sh, mm, w, k)
}
func (m *downModule) Logout(pkcs11.SessionHandle) error { return nil }

// TestReview2ReplicaDownDuringRotationNeverComesBack: replica B's link to
// the HSM is down while A rotates the KEK and retires the old one (the
// rotation is done once the store counts nothing under the old KEK: it
// does not wait for replicas to follow). B could not follow the ring
// (SetRing needs a connection), so it still reconnects to its primary,
// the old KEK, which is gone: the F5 fix drops a missing KEK of the
// others, never the primary. B retries for ever and answers 503 until it
// is restarted; following the store's ring does not help, since SetRing
// refuses while disconnected.
func TestReview2ReplicaDownDuringRotationNeverComesBack(t *testing.T) {
	ctx := context.Background()
	cfg := testhsm.Config(t)
	cfg.KEKLabel = "review2-down-" + newID()[:8]
	a, err := hsm.Open(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	old := a.KEKID()
	mod, err := hsm.LoadModule(cfg.Module)
	if err != nil {
		t.Fatal(err)
	}
	dm := &downModule{Module: mod}
	bcfg := cfg
	bcfg.KEKID, bcfg.CreateKEK, bcfg.Loaded = old, false, dm
	b, err := hsm.Open(bcfg)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	sc := kms.SealContext{Key: "k", Version: 1, Kind: "ml-kem-768"}

	// B's link goes down.
	dm.down.Store(true)
	if _, err := b.Seal(ctx, sc, kms.NewSecret([]byte("x"))); err == nil {
		t.Fatal("seal with the link down")
	}
	// Meanwhile A rotates, everything is rewrapped, A retires the old KEK.
	next := newID()
	if err := a.NewKEK(ctx, next); err != nil {
		t.Fatal(err)
	}
	if err := a.SetRing(next, []string{old}); err != nil {
		t.Fatal(err)
	}
	if err := a.DestroyKEK(ctx, old); err != nil {
		t.Fatal(err)
	}
	if err := a.SetRing(next, nil); err != nil {
		t.Fatal(err)
	}
	// B tries to follow the store's ring while down (runRing, each second).
	if err := b.SetRing(next, nil); err == nil {
		t.Fatal("SetRing while disconnected succeeded")
	} else {
		t.Logf("B follows the ring while down: %v", err)
	}
	// The link is back.
	dm.down.Store(false)
	var serr, ferr error
	deadline := time.Now().Add(6 * time.Second)
	for time.Now().Before(deadline) {
		ferr = b.SetRing(next, nil) // runRing
		if _, serr = b.Seal(ctx, sc, kms.NewSecret([]byte("x"))); serr == nil {
			break
		}
		time.Sleep(250 * time.Millisecond)
	}
	if serr != nil {
		t.Errorf("replica B, whose HSM link was down during the rotation and retire, still cannot seal 6 s after the link came back (follows the ring: %v): %v", ferr, serr)
	}
}

// TestReview2HasKEKPutsForeignKEKInRing: the F2 fix says DestroyKEK
// takes only a KEK of this sealer's ring; but knows() (every Unseal of a
// blob naming a KEK, and HasKEK, which kmsd restore calls for each KEK a
// backup names) adds to the ring any KEK the token holds under the label,
// another data dir's included. It is then listed by KEKs() and destroyed
// by DestroyKEK.
func TestReview2HasKEKPutsForeignKEKInRing(t *testing.T) {
	ctx := context.Background()
	cfg := testhsm.Config(t)
	cfg.KEKLabel = "review2-fk-" + newID()[:8]
	a, err := hsm.Open(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	// Deployment B, on the same token and label, its own KEK.
	bcfg := cfg
	bcfg.KEKID, bcfg.CreateKEK = a.KEKID(), false
	b, err := hsm.Open(bcfg)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	foreign := newID()
	if err := b.NewKEK(ctx, foreign); err != nil {
		t.Fatal(err)
	}
	if err := b.SetRing(foreign, nil); err != nil {
		t.Fatal(err)
	}
	sc := kms.SealContext{Key: "b-key", Version: 1, Kind: "ml-kem-768"}
	blob, err := b.Seal(ctx, sc, kms.NewSecret([]byte("B's secret")))
	if err != nil {
		t.Fatal(err)
	}
	// A meets B's KEK id once (a blob naming it: a planted record-key
	// value, a backup's version).
	_ = a.HasKEK(foreign)
	_, others := a.KEKs()
	t.Logf("A's ring after HasKEK(%s): others %v", foreign, others)
	if err := a.DestroyKEK(ctx, foreign); err == nil {
		t.Errorf("A's DestroyKEK destroyed KEK %s, deployment B's (not in A's store's ring)", foreign)
	}
	if _, err := b.Unseal(ctx, sc, blob); err != nil {
		t.Errorf("deployment B's secret no longer opens: %v", err)
	}
}

// hookModule runs hook once, in the next wrap or encrypt after it is set.
type hookModule struct {
	hsm.Module
	hook atomic.Pointer[func()]
}

func (m *hookModule) fire() {
	if h := m.hook.Swap(nil); h != nil {
		(*h)()
	}
}
func (m *hookModule) Encrypt(sh pkcs11.SessionHandle, b []byte) ([]byte, error) {
	m.fire()
	return m.Module.Encrypt(sh, b)
}
func (m *hookModule) WrapKey(sh pkcs11.SessionHandle, mm []*pkcs11.Mechanism, w, k pkcs11.ObjectHandle) ([]byte, error) {
	m.fire()
	return m.Module.WrapKey(sh, mm, w, k)
}

// TestReview2SetRingAcrossReconnect: the F13 fix finds the new ring's
// handles under the lock (step 1), lets go of it to wrap the ping block
// (step 2), and takes it again to switch (step 3), without checking that
// the connection is still the one the handles came from. A reconnection
// in between (another operation failed meanwhile: the module finalized
// and initialized again, every handle renumbered) leaves the new
// connection's primary on a handle of the old one.
func TestReview2SetRingAcrossReconnect(t *testing.T) {
	ctx := context.Background()
	cfg := testhsm.Config(t)
	cfg.KEKLabel = "review2-rc-" + newID()[:8]
	mod, err := hsm.LoadModule(cfg.Module)
	if err != nil {
		t.Fatal(err)
	}
	hm := &hookModule{Module: mod}
	cfg.Loaded = hm
	s, err := hsm.Open(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	old := s.KEKID()
	next := newID()
	if err := s.NewKEK(ctx, next); err != nil {
		t.Fatal(err)
	}
	// While SetRing wraps its ping block (step 2), another operation
	// fails and the supervisor reconnects as soon as the lock is free.
	h := func() {
		s.BreakForTest(pkcs11.Error(pkcs11.CKR_DEVICE_ERROR))
		time.Sleep(500 * time.Millisecond)
	}
	hm.hook.Store(&h)
	if err := s.SetRing(next, []string{old}); err != nil {
		t.Skipf("SetRing saw the reconnection: %v", err)
	}
	sc := kms.SealContext{Key: "k", Version: 1, Kind: "ml-kem-768"}
	blob, serr := s.Seal(ctx, sc, kms.NewSecret([]byte("secret")))
	perr := s.Ping(ctx)
	// The blob, by a fresh process that finds KEK next by label and id.
	fcfg := cfg
	fcfg.Loaded, fcfg.KEKID, fcfg.CreateKEK = nil, next, false
	var uerr error
	if serr == nil {
		if f, err := hsm.Open(fcfg); err != nil {
			uerr = err
		} else {
			_, uerr = f.Unseal(ctx, sc, blob)
			f.Close()
		}
	}
	t.Logf("after SetRing across a reconnection: seal %v; ping %v; the blob in a fresh process: %v", serr, perr, uerr)
	if serr != nil || perr != nil || uerr != nil {
		t.Errorf("SetRing across a reconnection left the sealer on stale handles: seal %v; ping %v; the blob sealed under %s by it, opened by a fresh process: %v", serr, perr, next, uerr)
	}
}
