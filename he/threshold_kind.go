package he

import (
	"context"
	"fmt"
	"io"
	"math"

	"github.com/tuneinsight/lattigo/v6/core/rlwe"

	"github.com/kmsd-project/kmsd/he/threshold"
	"github.com/kmsd-project/kmsd/kms"
)

var _ kms.ThresholdKind = (*Kind)(nil)

// thresholdConfig is the setup configuration of policy p for party self.
func (k *Kind) thresholdConfig(p kms.Policy, self int, crs [32]byte) (threshold.Config, *Params, error) {
	params, spec, gal, err := k.resolve(p)
	if err != nil {
		return threshold.Config{}, nil, err
	}
	if p.Threshold == nil {
		return threshold.Config{}, nil, kms.Errorf(kms.KindInvalid, "not a threshold policy")
	}
	return threshold.Config{Params: params.RLWE(), N: len(p.Threshold.Parties), T: p.Threshold.T, Self: self,
		GaloisElements: gal, Relinearization: spec.Relinearization, CRS: crs}, params, nil
}

// NewThresholdSetup implements kms.ThresholdKind.
func (k *Kind) NewThresholdSetup(p kms.Policy, self int, crs [32]byte) (kms.ThresholdSetup, error) {
	cfg, params, err := k.thresholdConfig(p, self, crs)
	if err != nil {
		return nil, err
	}
	s, err := threshold.NewSetup(cfg)
	if err != nil {
		return nil, err
	}
	return &thresholdSetup{k: k, params: params, s: s}, nil
}

// AggregateRound1 implements kms.ThresholdKind.
func (k *Kind) AggregateRound1(p kms.Policy, all [][]byte) ([]byte, error) {
	cfg, _, err := k.thresholdConfig(p, 1, [32]byte{})
	if err != nil {
		return nil, err
	}
	return cfg.AggregateRound1(all)
}

// AggregateRound2 implements kms.ThresholdKind.
func (k *Kind) AggregateRound2(p kms.Policy, all [][]byte) ([]byte, error) {
	cfg, _, err := k.thresholdConfig(p, 1, [32]byte{})
	if err != nil {
		return nil, err
	}
	return cfg.AggregateRound2(all)
}

// PartialDecrypt implements kms.ThresholdKind: each party floods its own
// answer with the plan's noise (the requester sees every answer).
func (k *Kind) PartialDecrypt(share kms.Secret, manifest []byte, active []int, parsed any, target []byte, plan kms.DecryptPlan) ([]byte, error) {
	p, err := k.versionParams(manifest)
	if err != nil {
		return nil, err
	}
	sh, err := threshold.UnmarshalShare(p.RLWE(), share.Reveal())
	if err != nil {
		return nil, err
	}
	defer sh.Wipe()
	pk, err := threshold.DecodeTarget(p.RLWE(), target)
	if err != nil {
		return nil, kms.Errorf(kms.KindInvalid, "%v", err)
	}
	ct, ok := parsed.(*rlwe.Ciphertext)
	if !ok {
		return nil, fmt.Errorf("he: parsed ciphertext is a %T", parsed)
	}
	return threshold.PartialDecrypt(p.RLWE(), sh, active, ct, pk, math.Max(plan.FloodSigmaLog2, 0))
}

// thresholdSetup is he's side of a party's setup.
type thresholdSetup struct {
	k      *Kind
	params *Params
	s      *threshold.Setup
}

func (t *thresholdSetup) Round1() ([]byte, map[int][]byte, error) { return t.s.Round1() }
func (t *thresholdSetup) Round2(agg1 []byte) ([]byte, error)      { return t.s.Round2(agg1) }

// Finish writes the collective keys in their full form: every party's
// blobs are the same bytes (the uniform halves come from the CRS, not
// from a seed of kmsd's own, so the seeded form does not apply).
func (t *thresholdSetup) Finish(ctx context.Context, agg1, agg2 []byte, private map[int][]byte) (*kms.Keyset, kms.Secret, error) {
	keys, share, err := t.s.Finish(agg1, agg2, private)
	if err != nil {
		return nil, kms.Secret{}, err
	}
	defer share.Wipe()
	ks := &kms.Keyset{ParamsID: t.params.ID, Params: t.params.JSON}
	var written []string
	put := func(key interface {
		WriteTo(io.Writer) (int64, error)
	}) (kms.BlobRef, error) {
		d, size, err := Put(ctx, t.k.store, func(w io.Writer) error { _, err := key.WriteTo(w); return err })
		if err != nil {
			return kms.BlobRef{}, err
		}
		written = append(written, string(d))
		return kms.BlobRef{Digest: string(d), Size: size}, nil
	}
	fail := func(err error) (*kms.Keyset, kms.Secret, error) {
		t.k.RemoveBlobs(written)
		return nil, kms.Secret{}, err
	}
	if ks.PublicKey, err = put(keys.PublicKey); err != nil {
		return fail(err)
	}
	if keys.Relinearization != nil {
		r, err := put(keys.Relinearization)
		if err != nil {
			return fail(err)
		}
		ks.Relinearization = &r
	}
	for _, gk := range keys.Galois {
		r, err := put(gk)
		if err != nil {
			return fail(err)
		}
		ks.Galois = append(ks.Galois, kms.GaloisRef{GaloisElement: gk.GaloisElement, Digest: r.Digest, Size: r.Size})
	}
	b, err := share.MarshalBinary()
	if err != nil {
		return fail(err)
	}
	return ks, kms.NewSecret(b), nil
}
