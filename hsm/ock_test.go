package hsm_test

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/kmsd-project/kmsd/hsm"
	"github.com/kmsd-project/kmsd/internal/testock"
	"github.com/kmsd-project/kmsd/kms"
	"github.com/kmsd-project/kmsd/kms/sealertest"
)

// TestOpencryptoki runs the sealer on a second real PKCS#11
// implementation, Debian 12's opencryptoki soft token (3.8: AES-CBC-PAD
// and HMAC, no GCM, no key wrap). auto picks cbc-hmac and makes its MAC
// key beside the KEK; the KEK is sensitive and never extractable; the
// conformance suite passes; a blob opens after the sealer is opened again
// (without creating anything); the gcm profile, asked for by name, is
// refused naming the mechanism the token lacks.
func TestOpencryptoki(t *testing.T) {
	cfg := testock.Config(t)
	s, err := hsm.Open(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if s.Profile() != hsm.ProfileCBCHMAC {
		t.Fatalf("profile %s, want cbc-hmac", s.Profile())
	}
	ctx := context.Background()
	a, err := s.KEKAttributes(ctx)
	if err != nil || a.Extractable || !a.Sensitive || !a.NeverExtractable || !a.Token {
		t.Fatalf("KEK attributes %+v %v", a, err)
	}
	t.Run("conformance", func(t *testing.T) { sealertest.Run(t, func(t *testing.T) kms.Sealer { return s }) })
	blob, err := s.Seal(ctx, sc, kms.NewSecret([]byte("sealed on opencryptoki")))
	if err != nil {
		t.Fatal(err)
	}
	s.Close()
	cfg.CreateKEK = false
	s2, err := hsm.Open(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	if got, err := s2.Unseal(ctx, sc, blob); err != nil || string(got.Reveal()) != "sealed on opencryptoki" {
		t.Fatalf("after reopening: %v", err)
	}
	cfg.Profile = hsm.ProfileGCM
	if _, err := hsm.Open(cfg); !errors.Is(err, hsm.ErrMechanism) || !strings.Contains(err.Error(), "CKM_AES_GCM") {
		t.Fatalf("gcm on opencryptoki 3.8: %v", err)
	}
}
