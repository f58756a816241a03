package he

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"math"
	"sync"

	"github.com/tuneinsight/lattigo/v6/core/rlwe"
	"github.com/tuneinsight/lattigo/v6/schemes/bgv"
	"github.com/tuneinsight/lattigo/v6/schemes/ckks"

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
	return int64(ciphertextSize(rp.N(), rp.MaxLevel())) + 4096, nil
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
// checks that the envelope describes it: its level, its scale (to 1e-9)
// and a slot count the ciphertext has. It does not compare key, version or
// parameter id: the caller knows which it expects (Envelope.MatchVersion).
func OpenEnvelope(rp rlwe.Parameters, env *kms.Envelope) (*rlwe.Ciphertext, error) {
	ct, err := ParseCiphertext(rp, env.Ciphertext)
	if err != nil {
		return nil, err
	}
	if ct.Level() != env.Level {
		return nil, kms.Errorf(kms.KindInvalid, "the envelope says level %d, its ciphertext is at level %d", env.Level, ct.Level())
	}
	if s, _ := ct.Scale.Value.Float64(); math.Abs(s-env.Scale) > 1e-9*s {
		return nil, kms.Errorf(kms.KindInvalid, "the envelope says scale %g, its ciphertext has %g", env.Scale, s)
	}
	if slots := ct.Slots(); env.Slots > slots {
		return nil, kms.Errorf(kms.KindInvalid, "the envelope says %d slots in use, its ciphertext has %d", env.Slots, slots)
	}
	return ct, nil
}

// metaSize is the size of a serialized rlwe.MetaData (fixed: Lattigo pads
// its JSON).
var metaSize = rlwe.MetaData{}.BinarySize()

// ciphertextSize is the size of a serialized degree-1 ciphertext of ring
// degree n at level: a metadata flag and the metadata, then a vector of two
// polynomials, each a vector of level+1 rows of n coefficients, every
// vector preceded by its length as a little-endian uint64.
func ciphertextSize(n, level int) int {
	return 1 + metaSize + 8 + 2*(8+(level+1)*(8+8*n))
}

// headersMatch reports whether the vector lengths in a serialized
// degree-1 ciphertext of ring degree n at level (b of ciphertextSize) are
// exactly 2, level+1 and n: no length can make the decoder allocate more
// than the bytes hold.
func headersMatch(b []byte, n, level int) bool {
	o := 1 + metaSize
	u64 := func(want int) bool {
		ok := binary.LittleEndian.Uint64(b[o:]) == uint64(want)
		o += 8
		return ok
	}
	if !u64(2) {
		return false
	}
	for range 2 {
		if !u64(level + 1) {
			return false
		}
		for range level + 1 {
			if !u64(n) {
				return false
			}
			o += 8 * n
		}
	}
	return o == len(b)
}

// ParseCiphertext parses a degree-1 Lattigo ciphertext for parameters rp.
// Nothing is handed to Lattigo's decoder before the bytes are shown to be
// a ciphertext of exactly this shape: one of the sizes a degree-1
// ciphertext of these parameters has, metadata that says slot-encoded, in
// the parameters' domain, not in Montgomery form, with every slot, a
// finite scale of at least 1, and vector lengths that match the size (so
// no length can make Lattigo allocate more than the ciphertext). Sizes
// are computed, not measured on a ciphertext built per request.
// A ciphertext of other parameters is refused where it can be told apart:
// a coefficient not below its modulus, another degree or level.
func ParseCiphertext(rp rlwe.Parameters, b []byte) (ct *rlwe.Ciphertext, err error) {
	defer func() {
		if r := recover(); r != nil {
			ct, err = nil, kms.Errorf(kms.KindInvalid, "not a Lattigo ciphertext")
		}
	}()
	level := -1
	for l := 0; l <= rp.MaxLevel(); l++ {
		if len(b) == ciphertextSize(rp.N(), l) {
			level = l
			break
		}
	}
	if level < 0 {
		return nil, kms.Errorf(kms.KindInvalid, "not a degree-1 ciphertext of the key's parameters (size %d): another parameter set, truncated, or not a Lattigo ciphertext", len(b))
	}
	if b[0] != 1 {
		return nil, kms.Errorf(kms.KindInvalid, "not a Lattigo ciphertext: no metadata")
	}
	var md rlwe.MetaData
	if err := md.UnmarshalBinary(b[1 : 1+metaSize]); err != nil {
		return nil, kms.Errorf(kms.KindInvalid, "not a Lattigo ciphertext: malformed metadata")
	}
	// One encoding per metadata: what Lattigo writes for what it read.
	if canon, err := md.MarshalBinary(); err != nil || !bytes.Equal(canon, b[1:1+metaSize]) {
		return nil, kms.Errorf(kms.KindInvalid, "not a Lattigo ciphertext: metadata not as Lattigo writes it")
	}
	scale, _ := md.Scale.Value.Float64()
	switch {
	case !md.IsBatched:
		// Decryption decodes slots; a ciphertext marked as holding
		// coefficients would have its plaintext's coefficients returned.
		return nil, kms.Errorf(kms.KindInvalid, "ciphertext not slot-encoded (IsBatched false): kmsd decrypts slots only")
	case md.LogDimensions.Cols != rp.LogN()-1 || md.LogDimensions.Rows < 0 || md.LogDimensions.Rows > 1:
		return nil, kms.Errorf(kms.KindInvalid, "ciphertext of dimensions 2^%d x 2^%d: encode with every slot (2^%d columns)", md.LogDimensions.Rows, md.LogDimensions.Cols, rp.LogN()-1)
	case md.IsNTT != rp.NTTFlag():
		return nil, kms.Errorf(kms.KindInvalid, "ciphertext in the wrong domain for these parameters")
	case md.IsMontgomery:
		return nil, kms.Errorf(kms.KindInvalid, "ciphertext in Montgomery form")
	case md.IsBitReversed:
		return nil, kms.Errorf(kms.KindInvalid, "ciphertext with bit-reversed slots")
	case !(scale >= 1) || math.IsInf(scale, 0):
		return nil, kms.Errorf(kms.KindInvalid, "ciphertext scale must be a finite number of at least 1")
	}
	if !headersMatch(b, rp.N(), level) {
		return nil, kms.Errorf(kms.KindInvalid, "not a degree-1 ciphertext of the key's parameters at level %d: its headers differ (another parameter set, or not a Lattigo ciphertext)", level)
	}
	c := new(rlwe.Ciphertext)
	if _, err := c.ReadFrom(bytes.NewReader(b)); err != nil {
		return nil, kms.Errorf(kms.KindInvalid, "not a Lattigo ciphertext (MarshalBinary bytes)")
	}
	switch {
	case c.Degree() != 1:
		return nil, kms.Errorf(kms.KindInvalid, "ciphertext of degree %d: relinearize to degree 1 first", c.Degree())
	case c.N() != rp.N():
		return nil, kms.Errorf(kms.KindInvalid, "ciphertext of ring degree %d, the key's parameters have %d: another parameter set", c.N(), rp.N())
	case c.Level() != level:
		return nil, kms.Errorf(kms.KindInvalid, "ciphertext at level %d, the key's parameters have %d: another parameter set", c.Level(), rp.MaxLevel())
	}
	q := rp.Q()
	for _, poly := range c.Value {
		for i := 0; i <= c.Level(); i++ {
			for _, x := range poly.Coeffs[i] {
				if x >= q[i] {
					return nil, kms.Errorf(kms.KindInvalid, "ciphertext coefficient above modulus %d: another parameter set", i)
				}
			}
		}
	}
	return c, nil
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
