package hsm_test

import (
	"context"
	"testing"

	"github.com/kmsd-project/kmsd/internal/testhsm"
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
