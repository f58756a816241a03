package hsm_test

import (
	"bytes"
	"context"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/kmsd-project/kmsd/hsm"
	"github.com/kmsd-project/kmsd/internal/testhsm"
	"github.com/kmsd-project/kmsd/kms"
)

// TestReviewDestroyPrimaryByUppercaseID (an outside review's finding):
// DestroyKEK refused the primary by comparing id strings, and the same
// CKA_ID in upper-case hex, found in the token by its bytes, destroyed the
// primary KEK. Now an id is lower-case hex or refused, and only a KEK of
// the ring other than the primary is destroyed.
func TestReviewDestroyPrimaryByUppercaseID(t *testing.T) {
	ctx := context.Background()
	cfg := testhsm.Config(t)
	cfg.KEKLabel = "review-up-" + newID()[:8]
	a, err := hsm.Open(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	sc := kms.SealContext{Key: "k", Version: 1, Kind: "ml-kem-768"}
	blob, err := a.Seal(ctx, sc, kms.NewSecret([]byte("secret")))
	if err != nil {
		t.Fatal(err)
	}
	primary := a.KEKID()
	if err := a.DestroyKEK(ctx, primary); !errors.Is(err, hsm.ErrKEKInUse) {
		t.Fatalf("destroy the primary by its id: %v", err)
	}
	err = a.DestroyKEK(ctx, strings.ToUpper(primary))
	if err == nil {
		t.Errorf("DestroyKEK(%s) (the primary, upper case) accepted", strings.ToUpper(primary))
	}
	if _, err := a.Unseal(ctx, sc, blob); err != nil {
		t.Errorf("a blob sealed under the primary no longer opens: %v", err)
	}
	ocfg := cfg
	ocfg.KEKID, ocfg.CreateKEK = primary, false
	if s, err := hsm.Open(ocfg); err != nil {
		t.Errorf("the primary KEK is gone from the token: %v", err)
	} else {
		s.Close()
	}
}

// TestReviewReplicaStuckAfterRetire: a replica whose ring still lists the
// old KEK (it follows the store's ring once a second) when another
// process retires (destroys) it, and that has to reconnect meanwhile,
// never reconnects: connect insists on finding every KEK of the ring,
// and SetRing (following the ring) needs a connection.
func TestReviewReplicaStuckAfterRetire(t *testing.T) {
	ctx := context.Background()
	cfg := testhsm.Config(t)
	cfg.KEKLabel = "review-stuck-" + newID()[:8]
	a, err := hsm.Open(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	old := a.KEKID()
	rcfg := cfg
	rcfg.KEKID, rcfg.CreateKEK = old, false
	replica, err := hsm.Open(rcfg)
	if err != nil {
		t.Fatal(err)
	}
	defer replica.Close()
	sc := kms.SealContext{Key: "k", Version: 1, Kind: "ml-kem-768"}
	blobOld, err := a.Seal(ctx, sc, kms.NewSecret([]byte("secret")))
	if err != nil {
		t.Fatal(err)
	}
	next := newID()
	if err := a.NewKEK(ctx, next); err != nil {
		t.Fatal(err)
	}
	if err := a.SetRing(next, []string{old}); err != nil {
		t.Fatal(err)
	}
	// The replica followed the rotation (the old KEK stays in its ring
	// until the store's ring drops it).
	if err := replica.SetRing(next, []string{old}); err != nil {
		t.Fatal(err)
	}
	// Retire on the rotating process.
	if err := a.DestroyKEK(ctx, old); err != nil {
		t.Fatal(err)
	}
	// Within the second before the replica follows the ring again, it
	// meets the old KEK's handle once (a put-back record, a stale read,
	// or simply an HSM hiccup that makes it reconnect).
	_, err = replica.Unseal(ctx, sc, blobOld)
	t.Logf("replica unseal of an old blob after the retire: %v", err)
	time.Sleep(300 * time.Millisecond)
	// The replica now follows the store's ring (old KEK dropped).
	var serr error
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		if serr = replica.SetRing(next, nil); serr == nil {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	if serr != nil {
		t.Errorf("the replica cannot follow the ring after the retire: %v", serr)
	}
	if _, err := replica.Seal(ctx, sc, kms.NewSecret([]byte("x"))); err != nil {
		t.Errorf("the replica cannot seal under the new primary %s any more (5 s after the retire): %v", next, err)
	}
}

// TestReviewPingRacesSetRing: SetRing rewrites the ping block (makePing)
// outside the sealer's lock while Ping (readyz) reads it; between the
// switch and makePing, Ping unwraps the old block under the new primary.
// Run with -race.
func TestReviewPingRacesSetRing(t *testing.T) {
	ctx := context.Background()
	cfg := testhsm.Config(t)
	cfg.KEKLabel = "review-ping-" + newID()[:8]
	a, err := hsm.Open(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	k1 := a.KEKID()
	k2 := newID()
	if err := a.NewKEK(ctx, k2); err != nil {
		t.Fatal(err)
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var mu sync.Mutex
	var fails []string
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				if err := a.Ping(ctx); err != nil {
					mu.Lock()
					fails = append(fails, err.Error())
					mu.Unlock()
				}
			}
		}()
	}
	for i := range 40 {
		p, o := k2, k1
		if i%2 == 1 {
			p, o = k1, k2
		}
		if err := a.SetRing(p, []string{o}); err != nil {
			t.Fatal(err)
		}
	}
	close(stop)
	wg.Wait()
	if len(fails) > 0 {
		t.Errorf("%d Pings (readyz) failed while the ring switched, e.g. %s", len(fails), fails[0])
	}
	_ = bytes.Equal
}
