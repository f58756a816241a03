package he

import (
	"encoding/json"
	"fmt"
	"sync"

	"github.com/tuneinsight/lattigo/v6/core/rlwe"
	"github.com/tuneinsight/lattigo/v6/schemes/bgv"
	"github.com/tuneinsight/lattigo/v6/schemes/ckks"

	"github.com/kmsd-project/kmsd/he/ciphertext"
	"github.com/kmsd-project/kmsd/kms"
)

var _ kms.DecryptingKind = (*Kind)(nil)

// manifestParams are the parameters a version's manifest names, built once
// per parameter id.
var paramsCache sync.Map // params id -> *Params

func (k *Kind) versionParams(manifest []byte) (*Params, error) {
	var m kms.Manifest
	if err := json.Unmarshal(manifest, &m); err != nil {
		return nil, fmt.Errorf("manifest: %w", err)
	}
	if p, ok := paramsCache.Load(m.ParamsID); ok {
		return p.(*Params), nil
	}
	lit, err := m.Literal()
	if err != nil {
		return nil, fmt.Errorf("manifest: %w", err)
	}
	p, err := Resolve(k.scheme, lit)
	if err != nil {
		return nil, err
	}
	if p.ID != m.ParamsID {
		return nil, fmt.Errorf("manifest parameters hash to %s, not %s", p.ID, m.ParamsID)
	}
	paramsCache.Store(p.ID, p)
	return p, nil
}

// MaxCiphertextSize implements kms.DecryptingKind: a degree-1 ciphertext at
// the top level, and room for its metadata.
func (k *Kind) MaxCiphertextSize(manifest []byte) (int64, error) {
	p, err := k.versionParams(manifest)
	if err != nil {
		return 0, err
	}
	rp := p.RLWE()
	return int64(ciphertext.Size(rp.N(), rp.MaxLevel())) + 4096, nil
}

// ParseCiphertext implements kms.DecryptingKind: the envelope's
// ciphertext, checked against the version's parameters and against the
// envelope's own level, scale and slot count.
func (k *Kind) ParseCiphertext(manifest []byte, env *kms.Envelope) (any, error) {
	p, err := k.versionParams(manifest)
	if err != nil {
		return nil, err
	}
	ct, err := OpenEnvelope(p.RLWE(), env)
	if err != nil {
		return nil, err
	}
	want := p.CKKS.LogMaxDimensions()
	if k.scheme == BGV {
		want = p.BGV.LogMaxDimensions()
	}
	if ct.LogDimensions != want {
		return nil, kms.Errorf(kms.KindInvalid, "ciphertext of dimensions 2^%d x 2^%d, the key's parameters have 2^%d x 2^%d", ct.LogDimensions.Rows, ct.LogDimensions.Cols, want.Rows, want.Cols)
	}
	return ct, nil
}

// OpenEnvelope parses the envelope's ciphertext for parameters rp and
// checks that the envelope describes it (he/ciphertext.Open).
func OpenEnvelope(rp rlwe.Parameters, env *kms.Envelope) (*rlwe.Ciphertext, error) {
	return ciphertext.Open(rp, env)
}

// ParseCiphertext parses a degree-1 Lattigo ciphertext for parameters rp
// (he/ciphertext.Parse).
func ParseCiphertext(rp rlwe.Parameters, b []byte) (*rlwe.Ciphertext, error) {
	return ciphertext.Parse(rp, b)
}

type secretKey struct {
	sk *rlwe.SecretKey
}

// LoadSecret implements kms.DecryptingKind.
func (k *Kind) LoadSecret(seed kms.Secret, manifest []byte) (kms.PrivateKey, error) {
	p, err := k.versionParams(manifest)
	if err != nil {
		return nil, err
	}
	sk, err := SecretKey(p.RLWE(), seed.Reveal())
	if err != nil {
		return nil, err
	}
	return secretKey{sk}, nil
}

// Decrypt implements kms.DecryptingKind: CKKS slots' real parts after
// noise flooding of the plan's size, rounded to the plan's precision; BGV
// slots as integers mod t (the plan has shown the decryption correct).
func (k *Kind) Decrypt(priv kms.PrivateKey, manifest []byte, parsed any, plan kms.DecryptPlan) (any, error) {
	p, err := k.versionParams(manifest)
	if err != nil {
		return nil, err
	}
	sk, ok := priv.(secretKey)
	ct, ok2 := parsed.(*rlwe.Ciphertext)
	if !ok || !ok2 {
		return nil, fmt.Errorf("he: wrong key or ciphertext type")
	}
	if k.scheme == CKKS {
		if plan.Precision < MinFloodPrecision || plan.FloodSigmaLog2 <= 0 {
			return nil, fmt.Errorf("he: a ckks decryption without a flooding plan")
		}
		pt := rlwe.NewDecryptor(p.CKKS, sk.sk).DecryptNew(ct)
		if err := flood(p.RLWE(), pt, plan.FloodSigmaLog2); err != nil {
			return nil, err
		}
		vals := make([]float64, pt.Slots())
		if err := ckks.NewEncoder(p.CKKS).DecodePublic(pt, vals, float64(plan.Precision)); err != nil {
			return nil, err
		}
		return vals, nil
	}
	pt := rlwe.NewDecryptor(p.BGV, sk.sk).DecryptNew(ct)
	vals := make([]uint64, p.BGV.MaxSlots())
	if err := bgv.NewEncoder(p.BGV).Decode(pt, vals); err != nil {
		return nil, err
	}
	return vals, nil
}
