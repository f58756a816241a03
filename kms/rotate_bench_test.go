package kms_test

import (
	"context"
	"path/filepath"
	"testing"

	"github.com/kmsd-project/kmsd/hsm"
	"github.com/kmsd-project/kmsd/internal/testhsm"
	"github.com/kmsd-project/kmsd/internal/testock"
	"github.com/kmsd-project/kmsd/kms"
	"github.com/kmsd-project/kmsd/kms/pqc"
	"github.com/kmsd-project/kmsd/store/bolt"
)

// BenchmarkRotateByProfile is one rotation of an ML-DSA-65 key (a key
// generated, its seed sealed under the wrap profile, a bbolt commit with
// its audit record) on each token and profile (BENCHMARKS.md, issue 30).
func BenchmarkRotateByProfile(b *testing.B) {
	ctx := context.Background()
	cfgs := []struct {
		name string
		cfg  func(b *testing.B) hsm.Config
	}{
		{"softhsm2/gcm", func(b *testing.B) hsm.Config { return testhsm.Config(b) }},
		{"softhsm2/cbc-hmac", func(b *testing.B) hsm.Config {
			c := testhsm.Config(b)
			c.KEKLabel, c.Profile = "bench-rotate-cbc-hmac", hsm.ProfileCBCHMAC
			return c
		}},
		{"softhsm2/kwp", func(b *testing.B) hsm.Config {
			c := testhsm.Config(b)
			c.KEKLabel, c.Profile = "bench-rotate-kwp", hsm.ProfileKWP
			return c
		}},
		{"opencryptoki/cbc-hmac", func(b *testing.B) hsm.Config { return testock.Config(b) }},
	}
	for _, c := range cfgs {
		b.Run(c.name, func(b *testing.B) {
			sealer, err := hsm.Open(c.cfg(b))
			if err != nil {
				b.Fatal(err)
			}
			defer sealer.Close()
			st, err := bolt.Open(filepath.Join(b.TempDir(), "kms.db"), bolt.Options{Sealer: sealer})
			if err != nil {
				b.Fatal(err)
			}
			defer st.Close()
			svc, err := kms.NewService(kms.Config{Store: st, Sealer: sealer, Kinds: kms.NewRegistry(pqc.Kinds()...)})
			if err != nil {
				b.Fatal(err)
			}
			if _, _, err := svc.CreateKey(ctx, "bench", "ml-dsa-65", kms.Policy{}); err != nil {
				b.Fatal(err)
			}
			for b.Loop() {
				if _, _, err := svc.Rotate(ctx, "bench"); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
