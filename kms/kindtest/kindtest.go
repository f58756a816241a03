// Package kindtest is the conformance suite every key kind runs: the
// ML-KEM and ML-DSA kinds (kms/pqc) and the HE keyset kinds (he).
package kindtest

import (
	"bytes"
	"context"
	crand "crypto/rand"

	"io"
	"math/rand/v2"
	"testing"

	"github.com/kmsd-project/kmsd/kms"
)

// Encapsulator encapsulates to a KEM public key outside the kind (an
// independent implementation), giving the ciphertext and shared secret.
type Encapsulator func(public []byte) (ct, ss []byte, err error)

// seeded is a deterministic reader: the same seed gives the same bytes.
func seeded(seed uint64) io.Reader { return rand.NewChaCha8([32]byte{byte(seed), byte(seed >> 8)}) }

// Run checks what every kind must do. encaps names, for each KEM kind, an
// independent encapsulation; policy names, for each keyset kind, a small
// policy to generate with.
func Run(t *testing.T, kinds []kms.KeyKind, encaps map[string]Encapsulator, policy map[string]kms.Policy) {
	names := map[string]bool{}
	for _, k := range kinds {
		if k == nil || k.Name() == "" || names[k.Name()] {
			t.Fatalf("a kind without a name, or a second kind named %q", k.Name())
		}
		names[k.Name()] = true
		if len(k.Operations()) == 0 {
			t.Errorf("%s: no operations", k.Name())
		}
		t.Run(k.Name(), func(t *testing.T) {
			if ks, ok := k.(kms.KeysetKind); ok {
				runKeyset(t, ks, policy[k.Name()])
				return
			}
			runSecretKind(t, k, encaps[k.Name()])
		})
	}
}

func runSecretKind(t *testing.T, k kms.KeyKind, encaps Encapsulator) {
	s1, p1, err := k.Generate(seeded(1))
	if err != nil {
		t.Fatal(err)
	}
	s1b, p1b, _ := k.Generate(seeded(1))
	s2, p2, _ := k.Generate(seeded(2))
	if !s1.Equal(s1b) || !bytes.Equal(p1, p1b) {
		t.Error("Generate is not a function of its random source (it draws entropy elsewhere)")
	}
	if s1.Equal(s2) || bytes.Equal(p1, p2) {
		t.Error("two random sources gave the same key")
	}
	if s1.Len() == 0 || len(p1) == 0 {
		t.Fatal("an empty secret or public key")
	}
	priv, err := k.Load(s1)
	if err != nil {
		t.Fatal(err)
	}
	for _, bad := range [][]byte{nil, {1}, make([]byte, s1.Len()+1)} {
		if _, err := k.Load(kms.NewSecret(bad)); err == nil {
			t.Errorf("Load took a secret of %d bytes", len(bad))
		}
	}
	switch kk := k.(type) {
	case kms.SigningKind:
		msg, ctx := []byte("release v1.2.3"), []byte("ctx")
		sig, err := kk.Sign(crand.Reader, priv, msg, ctx)
		if err != nil {
			t.Fatal(err)
		}
		if ok, err := kk.Verify(p1, msg, ctx, sig); !ok || err != nil {
			t.Fatalf("its own signature does not verify: %v", err)
		}
		bad := bytes.Clone(sig)
		bad[len(bad)/2] ^= 1
		for _, c := range []struct {
			name           string
			pub, m, cx, sg []byte
		}{
			{"another message", p1, []byte("release v1.2.4"), ctx, sig},
			{"another context", p1, msg, []byte("other"), sig},
			{"a changed signature", p1, msg, ctx, bad},
			{"another key", p2, msg, ctx, sig},
			{"a short signature", p1, msg, ctx, sig[:10]},
		} {
			if ok, _ := kk.Verify(c.pub, c.m, c.cx, c.sg); ok {
				t.Errorf("verified with %s", c.name)
			}
		}
		if ok, err := kk.Verify(p1[:10], msg, ctx, sig); ok || err == nil {
			t.Errorf("a short public key: %v %v", ok, err)
		}
	case kms.KEMKind:
		if encaps == nil {
			t.Fatalf("no independent encapsulation given for KEM kind %s", k.Name())
		}
		ct, ss, err := encaps(p1)
		if err != nil {
			t.Fatal(err)
		}
		got, err := kk.Decapsulate(priv, ct)
		if err != nil || !bytes.Equal(got.Reveal(), ss) {
			t.Fatalf("decapsulation disagrees with an independent encapsulation: %v", err)
		}
		for _, bad := range [][]byte{nil, ct[:10], append(bytes.Clone(ct), 0)} {
			if _, err := kk.Decapsulate(priv, bad); err == nil {
				t.Errorf("decapsulated a ciphertext of %d bytes", len(bad))
			}
		}
	default:
		t.Fatalf("kind %s neither signs nor decapsulates", k.Name())
	}
}

func runKeyset(t *testing.T, k kms.KeysetKind, p kms.Policy) {
	if len(p.Params) == 0 {
		t.Fatalf("no policy given for keyset kind %s", k.Name())
	}
	if _, _, err := k.CheckPolicy(kms.Policy{}); kms.KindOf(err) != kms.KindInvalid {
		t.Errorf("a policy without parameters: %v, want an invalid-request error", err)
	}
	np, size, err := k.CheckPolicy(p)
	if err != nil || size <= 0 {
		t.Fatalf("CheckPolicy: %d %v", size, err)
	}
	seed := make([]byte, 32)
	rand.NewChaCha8([32]byte{9}).Read(seed)
	calls := 0
	ks, err := k.GenerateKeyset(context.Background(), kms.NewSecret(seed), np, func(done, total int, bytes int64) { calls++ })
	if err != nil {
		t.Fatal(err)
	}
	if ks.PublicKey.Digest == "" || ks.PublicKey.Size <= 0 || ks.ParamsID == "" || calls == 0 {
		t.Fatalf("keyset: %+v, %d progress calls", ks, calls)
	}
	digests := []string{}
	if ks.Relinearization != nil {
		digests = append(digests, ks.Relinearization.Digest)
	}
	for _, b := range ks.Galois {
		digests = append(digests, b.Digest)
	}
	k.RemoveBlobs(append(digests, ks.PublicKey.Digest))
	// A cancelled generation stops with an error, not a keyset.
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if ks, err := k.GenerateKeyset(ctx, kms.NewSecret(seed), np, nil); err == nil {
		t.Errorf("a cancelled generation returned %+v", ks)
	}
}
