package hsm_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"testing"

	"github.com/kmsd-project/kmsd/hsm"
	"github.com/kmsd-project/kmsd/internal/testhsm"
	"github.com/kmsd-project/kmsd/kms"
)

func newID() string {
	b := make([]byte, 16)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// TestKEKRing: a new KEK made beside the first and made primary seals
// what follows, while both open; a second sealer (a replica) that still
// has the first finds the new one in the token when it meets a blob
// sealed under it; the primary cannot be destroyed; once the old KEK is
// destroyed its blobs do not open (anywhere), the new one's do, and a
// sealer opened again on the new KEK works.
func TestKEKRing(t *testing.T) {
	ctx := context.Background()
	for _, p := range []hsm.Profile{hsm.ProfileGCM, hsm.ProfileKWP, hsm.ProfileCBCHMAC} {
		t.Run(string(p), func(t *testing.T) {
			cfg := testhsm.Config(t)
			cfg.KEKLabel, cfg.Profile = "ring-"+newID()[:8], p
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
			secret := []byte("the secret of version 1")
			blobA, err := a.Seal(ctx, sc, kms.NewSecret(bytes.Clone(secret)))
			if err != nil {
				t.Fatal(err)
			}
			next := newID()
			if err := a.NewKEK(ctx, next); err != nil {
				t.Fatal(err)
			}
			if err := a.NewKEK(ctx, next); err != nil { // found, as after a crash
				t.Fatalf("NewKEK again: %v", err)
			}
			if err := a.SetRing(next, []string{old}); err != nil {
				t.Fatal(err)
			}
			if p, o := a.KEKs(); p != next || len(o) != 1 || o[0] != old {
				t.Fatalf("ring %s %v", p, o)
			}
			blobB, err := a.Seal(ctx, sc, kms.NewSecret(bytes.Clone(secret)))
			if err != nil {
				t.Fatal(err)
			}
			if k, _ := hsm.BlobKEK(blobB); k != next {
				t.Fatalf("sealed under %s, want the new primary %s", k, next)
			}
			if err := a.Ping(ctx); err != nil {
				t.Fatalf("ping after the switch: %v", err)
			}
			for name, b := range map[string][]byte{"old": blobA, "new": blobB} {
				for sname, s := range map[string]*hsm.Sealer{"rotating": a, "replica": replica} {
					got, err := s.Unseal(ctx, sc, b)
					if err != nil || !bytes.Equal(got.Reveal(), secret) {
						t.Fatalf("%s blob on the %s sealer: %v", name, sname, err)
					}
				}
			}
			if err := a.DestroyKEK(ctx, next); !errors.Is(err, hsm.ErrKEKInUse) {
				t.Fatalf("destroy the primary: %v", err)
			}
			if err := replica.SetRing(next, nil); err != nil {
				t.Fatal(err)
			}
			if err := a.DestroyKEK(ctx, old); err != nil {
				t.Fatal(err)
			}
			for sname, s := range map[string]*hsm.Sealer{"rotating": a, "replica": replica} {
				if _, err := s.Unseal(ctx, sc, blobA); !errors.Is(err, hsm.ErrBlob) {
					t.Fatalf("a blob under the destroyed KEK on the %s sealer: %v", sname, err)
				}
				if got, err := s.Unseal(ctx, sc, blobB); err != nil || !bytes.Equal(got.Reveal(), secret) {
					t.Fatalf("the new KEK's blob on the %s sealer: %v", sname, err)
				}
			}
			ncfg := cfg
			ncfg.KEKID, ncfg.CreateKEK = next, false
			again, err := hsm.Open(ncfg)
			if err != nil {
				t.Fatal(err)
			}
			defer again.Close()
			if got, err := again.Unseal(ctx, sc, blobB); err != nil || !bytes.Equal(got.Reveal(), secret) {
				t.Fatalf("reopened on the new KEK: %v", err)
			}
			ocfg := cfg
			ocfg.KEKID, ocfg.CreateKEK = old, false
			if _, err := hsm.Open(ocfg); !errors.Is(err, hsm.ErrKEKMissing) {
				t.Fatalf("open on the destroyed KEK: %v", err)
			}
		})
	}
}
