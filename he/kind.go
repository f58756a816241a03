package he

import (
	"context"
	"errors"
	"fmt"
	"io"

	"github.com/kmsd-project/kmsd/kms"
)

// Kind is the ckks or bgv key kind: versions are keysets whose secret key
// is derived from a sealed seed and whose public and evaluation keys are
// blobs in store.
type Kind struct {
	scheme  Scheme
	store   Blobs
	workers int
	seeded  bool
}

var _ kms.KeysetKind = (*Kind)(nil)

// Kinds returns the ckks and bgv kinds writing blobs to store with workers
// goroutines (0: all cores).
//
// seeded stores new keys in their seeded form (he/seedkey).
func Kinds(store Blobs, workers int, seeded bool) []kms.KeyKind {
	return []kms.KeyKind{&Kind{scheme: CKKS, store: store, workers: workers, seeded: seeded}, &Kind{scheme: BGV, store: store, workers: workers, seeded: seeded}}
}

func (k *Kind) Name() string { return string(k.scheme) }

// Operations: decryption, for parties with the decryptor role.
func (k *Kind) Operations() []kms.Operation { return []kms.Operation{kms.OpDecrypt} }

var errKeysetOnly = errors.New("he: keyset kinds are generated with GenerateKeyset")

func (k *Kind) Generate(io.Reader) (kms.Secret, []byte, error) {
	return kms.Secret{}, nil, errKeysetOnly
}
func (k *Kind) Load(kms.Secret) (kms.PrivateKey, error) { return nil, errKeysetOnly }

func (k *Kind) resolve(p kms.Policy) (*Params, KeySpec, []uint64, error) {
	if len(p.Params) == 0 {
		return nil, KeySpec{}, nil, kms.Errorf(kms.KindInvalid, "policy.params is required for kind %s: a preset (%v) or a Lattigo parameters literal", k.scheme, Presets(k.scheme))
	}
	params, err := Resolve(k.scheme, p.Params)
	var pe *ErrParams
	if errors.As(err, &pe) {
		return nil, KeySpec{}, nil, kms.Errorf(kms.KindInvalid, "policy.params: %s", pe.Msg)
	}
	if err != nil {
		return nil, KeySpec{}, nil, err
	}
	spec := KeySpec{Rotations: p.Rotations, Conjugation: p.Conjugation, Relinearization: p.Relinearization}
	if (len(spec.Rotations) > 0 || spec.Conjugation || spec.Relinearization) && params.RLWE().PCount() == 0 {
		// Without the special primes P, a key switch adds noise as large
		// as the modulus: the evaluation keys would not work, and the
		// noise model that sizes decryption's flooding would not hold.
		return nil, KeySpec{}, nil, kms.Errorf(kms.KindInvalid, "policy.params: evaluation keys (rotations, conjugation, relinearization) need special primes: give P or LogP")
	}
	gal, err := GaloisElements(params, spec)
	if errors.As(err, &pe) {
		return nil, KeySpec{}, nil, kms.Errorf(kms.KindInvalid, "policy.rotations: %s", pe.Msg)
	}
	return params, spec, gal, err
}

// CheckPolicy implements kms.KeysetKind.
func (k *Kind) CheckPolicy(p kms.Policy) (kms.Policy, int64, error) {
	if p.DecryptLogPrecision < 0 || p.DecryptLogPrecision > MaxDecryptLogPrecision {
		return p, 0, kms.Errorf(kms.KindInvalid, "decrypt_log_precision must be between 1 and %d bits: decryption floods the noise, which leaves no more (README: What decryption reveals)", MaxDecryptLogPrecision)
	}
	if p.DecryptLogPrecision != 0 && k.scheme != CKKS {
		return p, 0, kms.Errorf(kms.KindInvalid, "decrypt_log_precision applies to ckks only")
	}
	if p.OnDemandGaloisKeys < -1 || p.OnDemandGaloisKeys > kms.MaxOnDemandGaloisKeys {
		return p, 0, kms.Errorf(kms.KindInvalid, "on_demand_galois_keys must be between 1 and %d (-1: none; absent: %d)", kms.MaxOnDemandGaloisKeys, kms.DefaultOnDemandGaloisKeys)
	}
	params, spec, gal, err := k.resolve(p)
	if err != nil {
		return p, 0, err
	}
	return p, EstimateSize(params, spec, gal), nil
}

// GenerateKeyset implements kms.KeysetKind.
func (k *Kind) GenerateKeyset(ctx context.Context, seed kms.Secret, p kms.Policy, progress func(done, total int, bytes int64)) (*kms.Keyset, error) {
	params, spec, gal, err := k.resolve(p)
	if err != nil {
		return nil, err
	}
	sk, err := SecretKey(params.RLWE(), seed.Reveal())
	if err != nil {
		return nil, err
	}
	blobs, err := Generate(ctx, params, sk, spec, gal, k.store, k.workers, progress, k.seeded)
	if err != nil {
		return nil, fmt.Errorf("generate keyset: %w", err)
	}
	ks := &kms.Keyset{ParamsID: params.ID, Params: params.JSON}
	for _, b := range blobs {
		r := b.ref()
		switch b.Kind {
		case "public":
			ks.PublicKey = r
		case "relinearization":
			ks.Relinearization = &r
		case "galois":
			ks.Galois = append(ks.Galois, kms.GaloisRef{GaloisElement: b.GaloisElement, Digest: r.Digest, Size: r.Size, Form: r.Form, FullDigest: r.FullDigest, FullSize: r.FullSize})
		}
	}
	return ks, nil
}

// RemoveBlobs implements kms.KeysetKind.
func (k *Kind) RemoveBlobs(digests []string) {
	for _, d := range digests {
		_ = k.store.Remove(context.Background(), Digest(d))
	}
}

var _ kms.ExtendingKind = (*Kind)(nil)

// evaluationParams are a version's parameters, refused if they have no
// special primes (no evaluation key works without them).
func (k *Kind) evaluationParams(manifest []byte) (*Params, error) {
	p, err := k.versionParams(manifest)
	if err != nil {
		return nil, err
	}
	if p.RLWE().PCount() == 0 {
		return nil, kms.Errorf(kms.KindFailedPrecondition, "the version's parameters have no special primes (P): no evaluation key works without them")
	}
	return p, nil
}

// GaloisElements implements kms.ExtendingKind.
func (k *Kind) GaloisElements(manifest []byte, rotations []int, conjugation bool) ([]uint64, error) {
	p, err := k.evaluationParams(manifest)
	if err != nil {
		return nil, err
	}
	els, err := GaloisElements(p, KeySpec{Rotations: rotations, Conjugation: conjugation})
	var pe *ErrParams
	if errors.As(err, &pe) {
		return nil, kms.Errorf(kms.KindInvalid, "rotations: %s", pe.Msg)
	}
	return els, err
}

// KeySize implements kms.ExtendingKind.
func (k *Kind) KeySize(manifest []byte) (int64, error) {
	p, err := k.versionParams(manifest)
	if err != nil {
		return 0, err
	}
	_, _, gk := KeySizes(p)
	return int64(gk), nil
}

// GenerateGalois implements kms.ExtendingKind.
func (k *Kind) GenerateGalois(ctx context.Context, seed kms.Secret, manifest []byte, galEls []uint64, progress func(done, total int, bytes int64)) ([]kms.GaloisRef, error) {
	p, err := k.evaluationParams(manifest)
	if err != nil {
		return nil, err
	}
	sk, err := SecretKey(p.RLWE(), seed.Reveal())
	if err != nil {
		return nil, err
	}
	blobs, err := GenerateGalois(ctx, p, sk, galEls, k.store, k.workers, progress, k.seeded)
	if err != nil {
		return nil, err
	}
	out := make([]kms.GaloisRef, len(blobs))
	for i, b := range blobs {
		r := b.ref()
		out[i] = kms.GaloisRef{GaloisElement: b.GaloisElement, Digest: r.Digest, Size: r.Size, Form: r.Form, FullDigest: r.FullDigest, FullSize: r.FullSize}
	}
	return out, nil
}

// GenerateSwitching implements kms.ExtendingKind.
func (k *Kind) GenerateSwitching(ctx context.Context, from kms.Secret, fromManifest []byte, to kms.Secret, toManifest []byte) (kms.BlobRef, error) {
	p, err := k.evaluationParams(fromManifest)
	if err != nil {
		return kms.BlobRef{}, err
	}
	pt, err := k.versionParams(toManifest)
	if err != nil {
		return kms.BlobRef{}, err
	}
	if pt.ID != p.ID {
		return kms.BlobRef{}, kms.Errorf(kms.KindInvalid, "the two versions have different parameters (%s and %s): a switching key joins versions of the same parameters", p.ID, pt.ID)
	}
	skFrom, err := SecretKey(p.RLWE(), from.Reveal())
	if err != nil {
		return kms.BlobRef{}, err
	}
	skTo, err := SecretKey(p.RLWE(), to.Reveal())
	if err != nil {
		return kms.BlobRef{}, err
	}
	b, err := GenerateSwitching(ctx, p, skFrom, skTo, k.store, k.seeded)
	if err != nil {
		return kms.BlobRef{}, err
	}
	return b.ref(), nil
}
