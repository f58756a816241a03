package he

import (
	"bytes"
	"encoding/json"
	"fmt"
	"math"
	"math/bits"
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
	return int64(layoutOf(rp, rp.MaxLevel()).size) + 4096, nil
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

// layout is what every degree-1 ciphertext of one parameter set and level
// has in common once serialized: its size, and after the metadata the
// bytes that are not coefficients (vector and polynomial headers).
type layout struct {
	size   int    // the whole serialization
	values []byte // the value section of a zero ciphertext
	coeff  []bool // which of its bytes are coefficient bytes
}

var layouts sync.Map // "<moduli> <level>" -> *layout

// metaSize is the size of a serialized rlwe.MetaData (fixed: Lattigo pads
// its JSON).
var metaSize = rlwe.MetaData{}.BinarySize()

// layoutOf is the layout of a degree-1 ciphertext of rp at level, built
// once from two templates: coefficients all zero, and all 0x0101...01
// cut below each modulus's top bit, so that every byte a coefficient can
// set differs between them and no header byte does (a coefficient's bytes
// above its modulus must be zero, and are checked as such).
func layoutOf(rp rlwe.Parameters, level int) *layout {
	key := fmt.Sprint(rp.N(), rp.Q(), level)
	if l, ok := layouts.Load(key); ok {
		return l.(*layout)
	}
	zero := rlwe.NewCiphertext(rp, 1, level)
	full := rlwe.NewCiphertext(rp, 1, level)
	for _, poly := range full.Value {
		for i := 0; i <= level; i++ {
			for j := range poly.Coeffs[i] {
				poly.Coeffs[i][j] = 0x0101010101010101 & (1<<(bits.Len64(rp.Q()[i])-1) - 1)
			}
		}
	}
	zb, err1 := zero.MarshalBinary()
	fb, err2 := full.MarshalBinary()
	if err1 != nil || err2 != nil || len(zb) != len(fb) {
		panic("he: ciphertext templates do not serialize alike")
	}
	off := 1 + metaSize
	l := &layout{size: len(zb), values: zb[off:], coeff: make([]bool, len(zb)-off)}
	for i := range l.values {
		l.coeff[i] = zb[off+i] != fb[off+i]
	}
	layouts.Store(key, l)
	return l
}

// ParseCiphertext parses a degree-1 Lattigo ciphertext for parameters rp.
// Nothing is handed to Lattigo's decoder before the bytes are shown to be
// a ciphertext of exactly this shape: one of the sizes a degree-1
// ciphertext of these parameters has, metadata that says slot-encoded, in
// the parameters' domain, not in Montgomery form, with every slot, a
// finite scale of at least 1, and headers identical to a template's (so
// no length in them can make Lattigo allocate more than the ciphertext).
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
		if len(b) == layoutOf(rp, l).size {
			level = l
			break
		}
	}
	if level < 0 {
		return nil, kms.Errorf(kms.KindInvalid, "not a degree-1 ciphertext of the key's parameters (size %d): another parameter set, truncated, or not a Lattigo ciphertext", len(b))
	}
	lay := layoutOf(rp, level)
	if b[0] != 1 {
		return nil, kms.Errorf(kms.KindInvalid, "not a Lattigo ciphertext: no metadata")
	}
	var md rlwe.MetaData
	if err := md.UnmarshalBinary(b[1 : 1+metaSize]); err != nil {
		return nil, kms.Errorf(kms.KindInvalid, "not a Lattigo ciphertext: malformed metadata")
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
	case !(scale >= 1) || math.IsInf(scale, 0):
		return nil, kms.Errorf(kms.KindInvalid, "ciphertext scale must be a finite number of at least 1")
	}
	vals := b[1+metaSize:]
	for i, c := range lay.coeff {
		if !c && vals[i] != lay.values[i] {
			return nil, kms.Errorf(kms.KindInvalid, "not a degree-1 ciphertext of the key's parameters at level %d: its headers differ (another parameter set, or not a Lattigo ciphertext)", level)
		}
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
