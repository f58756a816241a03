package hsm_test

import (
	"context"
	"testing"

	"github.com/kmsd-project/kmsd/hsm"
	"github.com/kmsd-project/kmsd/internal/testhsm"
	"github.com/kmsd-project/kmsd/internal/testock"
	"github.com/kmsd-project/kmsd/kms"
)

// BenchmarkSeal is one seal of a 32-byte seed: a fresh DEK, an HSM
// C_EncryptInit/C_Encrypt of the DEK under the KEK, and AES-GCM in software.
func BenchmarkSeal(b *testing.B) {
	s := testhsm.Open(b)
	ctx := context.Background()
	seed := make([]byte, 32)
	for b.Loop() {
		if _, err := s.Seal(ctx, sc, kms.NewSecret(seed)); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkUnseal is one unseal: an HSM C_DecryptInit/C_Decrypt of the DEK
// and AES-GCM in software.
func BenchmarkUnseal(b *testing.B) {
	s := testhsm.Open(b)
	ctx := context.Background()
	blob, err := s.Seal(ctx, sc, kms.NewSecret(make([]byte, 32)))
	if err != nil {
		b.Fatal(err)
	}
	for b.Loop() {
		if _, err := s.Unseal(ctx, sc, blob); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkUnsealParallel is unseal from GOMAXPROCS goroutines through the
// session pool.
func BenchmarkUnsealParallel(b *testing.B) {
	s := testhsm.Open(b)
	ctx := context.Background()
	blob, err := s.Seal(ctx, sc, kms.NewSecret(make([]byte, 32)))
	if err != nil {
		b.Fatal(err)
	}
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if _, err := s.Unseal(ctx, sc, blob); err != nil {
				b.Error(err)
				return
			}
		}
	})
}

// BenchmarkProfiles is a seal and an unseal of a 32-byte seed under each
// wrap profile on each token: SoftHSM2 (gcm, kwp, cbc-hmac; gcm-hsm-iv through
// the emulation of an HSM that draws the IV, over SoftHSM) and Debian's
// opencryptoki 3.8 (cbc-hmac, the one it can do).
func BenchmarkProfiles(b *testing.B) {
	ctx := context.Background()
	open := map[string]func(b *testing.B) *hsm.Sealer{
		"softhsm2/gcm": func(b *testing.B) *hsm.Sealer { return testhsm.Open(b) },
		"softhsm2/gcm-hsm-iv(emulated)": func(b *testing.B) *hsm.Sealer {
			cfg := testhsm.Config(b)
			mod, _ := hsm.LoadModule(cfg.Module)
			cfg.Loaded = &vendorModule{Module: mod, hsmIV: true}
			return openB(b, cfg)
		},
		"softhsm2/cbc-hmac": func(b *testing.B) *hsm.Sealer {
			cfg := testhsm.Config(b)
			cfg.KEKLabel, cfg.Profile = "bench-cbc-hmac", hsm.ProfileCBCHMAC
			mod, _ := hsm.LoadModule(cfg.Module)
			cfg.Loaded = &noGCM{Module: mod, noKWP: true} // the MAC key is made
			return openB(b, cfg)
		},
		"softhsm2/kwp": func(b *testing.B) *hsm.Sealer {
			cfg := testhsm.Config(b)
			cfg.KEKLabel, cfg.Profile = "bench-kwp", hsm.ProfileKWP
			return openB(b, cfg)
		},
		"opencryptoki/cbc-hmac": func(b *testing.B) *hsm.Sealer { return openB(b, testock.Config(b)) },
	}
	for _, name := range []string{"softhsm2/gcm", "softhsm2/gcm-hsm-iv(emulated)", "softhsm2/kwp", "softhsm2/cbc-hmac", "opencryptoki/cbc-hmac"} {
		b.Run(name, func(b *testing.B) {
			s := open[name](b)
			blob, err := s.Seal(ctx, sc, kms.NewSecret(make([]byte, 32)))
			if err != nil {
				b.Fatal(err)
			}
			b.Run("seal", func(b *testing.B) {
				for b.Loop() {
					if _, err := s.Seal(ctx, sc, kms.NewSecret(make([]byte, 32))); err != nil {
						b.Fatal(err)
					}
				}
			})
			b.Run("unseal", func(b *testing.B) {
				for b.Loop() {
					if _, err := s.Unseal(ctx, sc, blob); err != nil {
						b.Fatal(err)
					}
				}
			})
		})
	}
}

func openB(b *testing.B, cfg hsm.Config) *hsm.Sealer {
	s, err := hsm.Open(cfg)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { s.Close() })
	return s
}
