package pqc

import (
	"bytes"
	"crypto/mlkem"
	"crypto/rand"
	"strings"
	"testing"

	"github.com/cloudflare/circl/kem/mlkem/mlkem512"

	"github.com/kmsd-project/kmsd/kms"
	"github.com/kmsd-project/kmsd/kms/kindtest"
)

func TestSelfTestPasses(t *testing.T) {
	if err := SelfTest(); err != nil {
		t.Fatal(err)
	}
}

func TestSelfTestDetectsWrongVector(t *testing.T) {
	orig := katJSON
	defer func() { katJSON = orig }()
	// Flip one hex digit of the first expected public-key digest.
	i := bytes.Index(orig, []byte(`"public_sha256": "`)) + len(`"public_sha256": "`)
	bad := bytes.Clone(orig)
	if bad[i] == '0' {
		bad[i] = '1'
	} else {
		bad[i] = '0'
	}
	katJSON = bad
	err := SelfTest()
	if err == nil || !strings.Contains(err.Error(), "ML-KEM-512 keyGen") {
		t.Fatalf("SelfTest with a corrupted vector = %v, want a keyGen failure", err)
	}
}

func kind(t testing.TB, name string) kms.KeyKind {
	t.Helper()
	k, err := kms.NewRegistry(Kinds()...).Lookup(name)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func TestSignVerifyAllDSA(t *testing.T) {
	for _, name := range []string{"ml-dsa-44", "ml-dsa-65", "ml-dsa-87"} {
		t.Run(name, func(t *testing.T) {
			k := kind(t, name).(kms.SigningKind)
			secret, pub, err := k.Generate(rand.Reader)
			if err != nil {
				t.Fatal(err)
			}
			if secret.Len() != 32 {
				t.Fatalf("seed is %d bytes, want 32", secret.Len())
			}
			priv, err := k.Load(secret)
			if err != nil {
				t.Fatal(err)
			}
			msg, ctx := []byte("hello"), []byte("ctx")
			sig, err := k.Sign(nil, priv, msg, ctx)
			if err != nil {
				t.Fatal(err)
			}
			for _, c := range []struct {
				msg, ctx []byte
				want     bool
			}{{msg, ctx, true}, {[]byte("hellp"), ctx, false}, {msg, nil, false}, {msg, []byte("ctx2"), false}} {
				ok, err := k.Verify(pub, c.msg, c.ctx, sig)
				if err != nil || ok != c.want {
					t.Errorf("Verify(%q,%q) = %v, %v; want %v", c.msg, c.ctx, ok, err, c.want)
				}
			}
			if ok, _ := k.Verify(pub, msg, ctx, sig[:10]); ok {
				t.Error("a truncated signature verified")
			}
			if _, err := k.Sign(nil, priv, msg, make([]byte, 256)); err == nil {
				t.Error("a 256-byte context was accepted")
			}
		})
	}
}

// TestMLKEMInteropStdlib: Go's crypto/mlkem encapsulates to our public key
// and our decapsulation returns the same shared secret.
func TestMLKEMInteropStdlib(t *testing.T) {
	for _, name := range []string{"ml-kem-768", "ml-kem-1024"} {
		t.Run(name, func(t *testing.T) {
			k := kind(t, name).(kms.KEMKind)
			secret, pub, err := k.Generate(rand.Reader)
			if err != nil {
				t.Fatal(err)
			}
			if secret.Len() != 64 {
				t.Fatalf("seed is %d bytes, want 64", secret.Len())
			}
			var ss, ct []byte
			var seedKey []byte
			if name == "ml-kem-768" {
				ek, err := mlkem.NewEncapsulationKey768(pub)
				if err != nil {
					t.Fatal(err)
				}
				ss, ct = ek.Encapsulate()
				dk, _ := mlkem.NewDecapsulationKey768(secret.Reveal())
				seedKey = dk.EncapsulationKey().Bytes()
			} else {
				ek, err := mlkem.NewEncapsulationKey1024(pub)
				if err != nil {
					t.Fatal(err)
				}
				ss, ct = ek.Encapsulate()
				dk, _ := mlkem.NewDecapsulationKey1024(secret.Reveal())
				seedKey = dk.EncapsulationKey().Bytes()
			}
			if !bytes.Equal(seedKey, pub) {
				t.Fatal("the stdlib derives another public key from our seed: seed format differs from FIPS 203 d||z")
			}
			priv, err := k.Load(secret)
			if err != nil {
				t.Fatal(err)
			}
			got, err := k.Decapsulate(priv, ct)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got.Reveal(), ss) {
				t.Fatal("shared secrets differ")
			}
			if _, err := k.Decapsulate(priv, ct[1:]); kms.KindOf(err) != kms.KindInvalid {
				t.Fatalf("short ciphertext: err = %v, want invalid", err)
			}
		})
	}
}

func TestLoadRefusesWrongSeedSize(t *testing.T) {
	for _, k := range Kinds() {
		if _, err := k.Load(kms.NewSecret(make([]byte, 31))); err == nil {
			t.Errorf("%s loaded a 31-byte seed", k.Name())
		}
	}
}

// TestKindConformance runs the kind suite over every ML-KEM and ML-DSA
// kind; KEM kinds are checked against Go's crypto/mlkem (768, 1024) and
// circl's encapsulation (512), independent of the kind's decapsulation path.
func TestKindConformance(t *testing.T) {
	encaps := map[string]kindtest.Encapsulator{
		"ml-kem-768": func(pub []byte) ([]byte, []byte, error) {
			ek, err := mlkem.NewEncapsulationKey768(pub)
			if err != nil {
				return nil, nil, err
			}
			ss, ct := ek.Encapsulate()
			return ct, ss, nil
		},
		"ml-kem-1024": func(pub []byte) ([]byte, []byte, error) {
			ek, err := mlkem.NewEncapsulationKey1024(pub)
			if err != nil {
				return nil, nil, err
			}
			ss, ct := ek.Encapsulate()
			return ct, ss, nil
		},
		"ml-kem-512": func(pub []byte) ([]byte, []byte, error) {
			pk, err := mlkem512.Scheme().UnmarshalBinaryPublicKey(pub)
			if err != nil {
				return nil, nil, err
			}
			return mlkem512.Scheme().Encapsulate(pk)
		},
	}
	kindtest.Run(t, Kinds(), encaps, nil)
}

// BenchmarkAttestationSignature: what an HE attestation costs the identity
// key (ML-DSA-65 through this kind, as kms.Service.Attest and
// VerifyAttestation use it) for a 600-byte statement: one signature per
// attest, one verification per decryption and per evaluation input.
//
//	go test -run '^$' -bench BenchmarkAttestationSignature ./kms/pqc
func BenchmarkAttestationSignature(b *testing.B) {
	k := kind(b, "ml-dsa-65").(kms.SigningKind)
	secret, pub, err := k.Generate(rand.Reader)
	if err != nil {
		b.Fatal(err)
	}
	priv, err := k.Load(secret)
	if err != nil {
		b.Fatal(err)
	}
	msg, ctx := bytes.Repeat([]byte("s"), 600), []byte(kms.AttestationContext)
	sig, err := k.Sign(nil, priv, msg, ctx)
	if err != nil {
		b.Fatal(err)
	}
	b.Run("sign", func(b *testing.B) {
		for range b.N {
			if _, err := k.Sign(nil, priv, msg, ctx); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("verify", func(b *testing.B) {
		for range b.N {
			if ok, err := k.Verify(pub, msg, ctx, sig); err != nil || !ok {
				b.Fatal("does not verify")
			}
		}
	})
}
