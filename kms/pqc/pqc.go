// Package pqc provides the post-quantum key kinds (ML-KEM, ML-DSA) on
// cloudflare/circl. Material is stored as the FIPS 203 / FIPS 204 seed: 64
// bytes d||z for ML-KEM, 32 bytes xi for ML-DSA.
package pqc

import (
	"bytes"
	"errors"
	"fmt"
	"io"

	"github.com/cloudflare/circl/kem"
	"github.com/cloudflare/circl/kem/mlkem/mlkem1024"
	"github.com/cloudflare/circl/kem/mlkem/mlkem512"
	"github.com/cloudflare/circl/kem/mlkem/mlkem768"
	"github.com/cloudflare/circl/sign"
	"github.com/cloudflare/circl/sign/mldsa/mldsa44"
	"github.com/cloudflare/circl/sign/mldsa/mldsa65"
	"github.com/cloudflare/circl/sign/mldsa/mldsa87"

	"github.com/kmsd-project/kmsd/kms"
)

// Kinds returns the six post-quantum key kinds.
func Kinds() []kms.KeyKind {
	return []kms.KeyKind{
		&kemKind{name: "ml-kem-512", scheme: mlkem512.Scheme()},
		&kemKind{name: "ml-kem-768", scheme: mlkem768.Scheme()},
		&kemKind{name: "ml-kem-1024", scheme: mlkem1024.Scheme()},
		&dsaKind{name: "ml-dsa-44", scheme: mldsa44.Scheme(), signTo: signWith44},
		&dsaKind{name: "ml-dsa-65", scheme: mldsa65.Scheme(), signTo: signWith65},
		&dsaKind{name: "ml-dsa-87", scheme: mldsa87.Scheme(), signTo: signWith87},
	}
}

// kemKind is an ML-KEM parameter set.
type kemKind struct {
	name   string
	scheme kem.Scheme
}

var _ kms.KEMKind = (*kemKind)(nil)

func (k *kemKind) Name() string                { return k.name }
func (k *kemKind) Operations() []kms.Operation { return []kms.Operation{kms.OpDecapsulate} }

// CiphertextSize is the size of a ciphertext for this parameter set.
func (k *kemKind) CiphertextSize() int { return k.scheme.CiphertextSize() }

func (k *kemKind) Generate(rand io.Reader) (kms.Secret, []byte, error) {
	seed := make([]byte, k.scheme.SeedSize())
	if _, err := io.ReadFull(rand, seed); err != nil {
		return kms.Secret{}, nil, fmt.Errorf("read seed: %w", err)
	}
	s := kms.NewSecret(seed)
	pk, sk := k.scheme.DeriveKeyPair(seed)
	pub, err := pk.MarshalBinary()
	if err != nil {
		s.Wipe()
		return kms.Secret{}, nil, err
	}
	if err := k.pairwise(pk, sk); err != nil {
		s.Wipe()
		return kms.Secret{}, nil, err
	}
	return s, pub, nil
}

// pairwise is the FIPS 140-3 pair-wise consistency test: encapsulate to the
// public key and decapsulate with the private key.
func (k *kemKind) pairwise(pk kem.PublicKey, sk kem.PrivateKey) error {
	ct, ss, err := k.scheme.Encapsulate(pk)
	if err != nil {
		return fmt.Errorf("%s pair-wise test: %w", k.name, err)
	}
	ss2, err := k.scheme.Decapsulate(sk, ct)
	if err != nil || !bytes.Equal(ss, ss2) {
		return fmt.Errorf("%s pair-wise consistency test failed", k.name)
	}
	return nil
}

func (k *kemKind) Load(secret kms.Secret) (kms.PrivateKey, error) {
	if secret.Len() != k.scheme.SeedSize() {
		return nil, fmt.Errorf("%s seed is %d bytes, want %d", k.name, secret.Len(), k.scheme.SeedSize())
	}
	_, sk := k.scheme.DeriveKeyPair(secret.Reveal())
	return sk, nil
}

func (k *kemKind) Decapsulate(priv kms.PrivateKey, ct []byte) (kms.Secret, error) {
	if len(ct) != k.scheme.CiphertextSize() {
		return kms.Secret{}, kms.Errorf(kms.KindInvalid, "ciphertext is %d bytes; %s takes %d", len(ct), k.name, k.scheme.CiphertextSize())
	}
	sk, ok := priv.(kem.PrivateKey)
	if !ok {
		return kms.Secret{}, errors.New("pqc: private key of the wrong type")
	}
	ss, err := k.scheme.Decapsulate(sk, ct)
	if err != nil {
		return kms.Secret{}, err
	}
	return kms.NewSecret(ss), nil
}

// dsaKind is an ML-DSA parameter set.
type dsaKind struct {
	name   string
	scheme sign.Scheme
	signTo func(priv kms.PrivateKey, msg, ctx, sig []byte) error
}

var _ kms.SigningKind = (*dsaKind)(nil)

func (d *dsaKind) Name() string { return d.name }
func (d *dsaKind) Operations() []kms.Operation {
	return []kms.Operation{kms.OpSign, kms.OpVerify}
}

func (d *dsaKind) Generate(rand io.Reader) (kms.Secret, []byte, error) {
	seed := make([]byte, d.scheme.SeedSize())
	if _, err := io.ReadFull(rand, seed); err != nil {
		return kms.Secret{}, nil, fmt.Errorf("read seed: %w", err)
	}
	s := kms.NewSecret(seed)
	pk, sk := d.scheme.DeriveKey(seed)
	pub, err := pk.MarshalBinary()
	if err != nil {
		s.Wipe()
		return kms.Secret{}, nil, err
	}
	// Pair-wise consistency: a signature by the new private key verifies
	// under the new public key.
	msg := []byte("kmsd pair-wise consistency test")
	sig, err := d.Sign(nil, sk, msg, nil)
	if err != nil || !d.scheme.Verify(pk, msg, sig, nil) {
		s.Wipe()
		return kms.Secret{}, nil, fmt.Errorf("%s pair-wise consistency test failed", d.name)
	}
	return s, pub, nil
}

func (d *dsaKind) Load(secret kms.Secret) (kms.PrivateKey, error) {
	if secret.Len() != d.scheme.SeedSize() {
		return nil, fmt.Errorf("%s seed is %d bytes, want %d", d.name, secret.Len(), d.scheme.SeedSize())
	}
	_, sk := d.scheme.DeriveKey(secret.Reveal())
	return sk, nil
}

// Sign makes a hedged (randomized) FIPS 204 signature; circl draws the
// randomness from crypto/rand.
func (d *dsaKind) Sign(_ io.Reader, priv kms.PrivateKey, msg, ctx []byte) ([]byte, error) {
	if len(ctx) > 255 {
		return nil, kms.Errorf(kms.KindInvalid, "context must be at most 255 bytes")
	}
	sig := make([]byte, d.scheme.SignatureSize())
	if err := d.signTo(priv, msg, ctx, sig); err != nil {
		return nil, err
	}
	return sig, nil
}

// Verify checks a signature. A public key or signature of the wrong size is
// an invalid signature, not an error.
func (d *dsaKind) Verify(public, msg, ctx, sig []byte) (bool, error) {
	if len(ctx) > 255 {
		return false, kms.Errorf(kms.KindInvalid, "context must be at most 255 bytes")
	}
	if len(sig) != d.scheme.SignatureSize() {
		return false, nil
	}
	pk, err := d.scheme.UnmarshalBinaryPublicKey(public)
	if err != nil {
		return false, fmt.Errorf("stored %s public key: %w", d.name, err)
	}
	return d.scheme.Verify(pk, msg, sig, &sign.SignatureOpts{Context: string(ctx)}), nil
}

var errKeyType = errors.New("pqc: private key of the wrong type")

func signWith44(priv kms.PrivateKey, msg, ctx, sig []byte) error {
	sk, ok := priv.(*mldsa44.PrivateKey)
	if !ok {
		return errKeyType
	}
	return mldsa44.SignTo(sk, msg, ctx, true, sig)
}

func signWith65(priv kms.PrivateKey, msg, ctx, sig []byte) error {
	sk, ok := priv.(*mldsa65.PrivateKey)
	if !ok {
		return errKeyType
	}
	return mldsa65.SignTo(sk, msg, ctx, true, sig)
}

func signWith87(priv kms.PrivateKey, msg, ctx, sig []byte) error {
	sk, ok := priv.(*mldsa87.PrivateKey)
	if !ok {
		return errKeyType
	}
	return mldsa87.SignTo(sk, msg, ctx, true, sig)
}
