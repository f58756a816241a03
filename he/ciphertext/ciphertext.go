// Package ciphertext reads HE ciphertexts as they cross a process
// boundary (in a wire.Envelope): it checks the bytes are a degree-1 Lattigo
// ciphertext of given parameters, of exactly the shape those parameters
// give, before Lattigo's decoder reads them. kmsd's HE kinds and the
// workers' SDK (api/client/hekeys) share it; it does not link the service.
package ciphertext

import (
	"bytes"
	"encoding/binary"
	"math"

	"github.com/tuneinsight/lattigo/v6/core/rlwe"

	"github.com/kmsd-project/kmsd/kms/wire"
)

// Open parses the envelope's ciphertext for parameters rp and
// checks that the envelope describes it: its level, its scale (to 1e-9)
// and a slot count the ciphertext has. It does not compare key, version or
// parameter id: the caller knows which it expects (Envelope.MatchVersion).
func Open(rp rlwe.Parameters, env *wire.Envelope) (*rlwe.Ciphertext, error) {
	ct, err := Parse(rp, env.Ciphertext)
	if err != nil {
		return nil, err
	}
	if ct.Level() != env.Level {
		return nil, wire.Errorf(wire.KindInvalid, "the envelope says level %d, its ciphertext is at level %d", env.Level, ct.Level())
	}
	if s, _ := ct.Scale.Value.Float64(); math.Abs(s-env.Scale) > 1e-9*s {
		return nil, wire.Errorf(wire.KindInvalid, "the envelope says scale %g, its ciphertext has %g", env.Scale, s)
	}
	if slots := ct.Slots(); env.Slots > slots {
		return nil, wire.Errorf(wire.KindInvalid, "the envelope says %d slots in use, its ciphertext has %d", env.Slots, slots)
	}
	return ct, nil
}

// MetaSize is the size of a serialized rlwe.MetaData (fixed: Lattigo pads
// its JSON).
var MetaSize = rlwe.MetaData{}.BinarySize()

// Size is the size of a serialized degree-1 ciphertext of ring
// degree n at level: a metadata flag and the metadata, then a vector of two
// polynomials, each a vector of level+1 rows of n coefficients, every
// vector preceded by its length as a little-endian uint64.
func Size(n, level int) int {
	return 1 + MetaSize + 8 + 2*(8+(level+1)*(8+8*n))
}

// HeadersMatch reports whether the vector lengths in a serialized
// degree-1 ciphertext of ring degree n at level (b of Size) are
// exactly 2, level+1 and n: no length can make the decoder allocate more
// than the bytes hold.
func HeadersMatch(b []byte, n, level int) bool {
	o := 1 + MetaSize
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

// Parse parses a degree-1 Lattigo ciphertext for parameters rp.
// Nothing is handed to Lattigo's decoder before the bytes are shown to be
// a ciphertext of exactly this shape: one of the sizes a degree-1
// ciphertext of these parameters has, metadata that says slot-encoded, in
// the parameters' domain, not in Montgomery form, with every slot, a
// finite scale of at least 1, and vector lengths that match the size (so
// no length can make Lattigo allocate more than the ciphertext). Sizes
// are computed, not measured on a ciphertext built per request.
// A ciphertext of other parameters is refused where it can be told apart:
// a coefficient not below its modulus, another degree or level.
func Parse(rp rlwe.Parameters, b []byte) (ct *rlwe.Ciphertext, err error) {
	defer func() {
		if r := recover(); r != nil {
			ct, err = nil, wire.Errorf(wire.KindInvalid, "not a Lattigo ciphertext")
		}
	}()
	level := -1
	for l := 0; l <= rp.MaxLevel(); l++ {
		if len(b) == Size(rp.N(), l) {
			level = l
			break
		}
	}
	if level < 0 {
		return nil, wire.Errorf(wire.KindInvalid, "not a degree-1 ciphertext of the key's parameters (size %d): another parameter set, truncated, or not a Lattigo ciphertext", len(b))
	}
	if b[0] != 1 {
		return nil, wire.Errorf(wire.KindInvalid, "not a Lattigo ciphertext: no metadata")
	}
	var md rlwe.MetaData
	if err := md.UnmarshalBinary(b[1 : 1+MetaSize]); err != nil {
		return nil, wire.Errorf(wire.KindInvalid, "not a Lattigo ciphertext: malformed metadata")
	}
	// One encoding per metadata: what Lattigo writes for what it read.
	if canon, err := md.MarshalBinary(); err != nil || !bytes.Equal(canon, b[1:1+MetaSize]) {
		return nil, wire.Errorf(wire.KindInvalid, "not a Lattigo ciphertext: metadata not as Lattigo writes it")
	}
	scale, _ := md.Scale.Value.Float64()
	switch {
	case !md.IsBatched:
		// Decryption decodes slots; a ciphertext marked as holding
		// coefficients would have its plaintext's coefficients returned.
		return nil, wire.Errorf(wire.KindInvalid, "ciphertext not slot-encoded (IsBatched false): kmsd decrypts slots only")
	case md.LogDimensions.Cols != rp.LogN()-1 || md.LogDimensions.Rows < 0 || md.LogDimensions.Rows > 1:
		return nil, wire.Errorf(wire.KindInvalid, "ciphertext of dimensions 2^%d x 2^%d: encode with every slot (2^%d columns)", md.LogDimensions.Rows, md.LogDimensions.Cols, rp.LogN()-1)
	case md.IsNTT != rp.NTTFlag():
		return nil, wire.Errorf(wire.KindInvalid, "ciphertext in the wrong domain for these parameters")
	case md.IsMontgomery:
		return nil, wire.Errorf(wire.KindInvalid, "ciphertext in Montgomery form")
	case md.IsBitReversed:
		return nil, wire.Errorf(wire.KindInvalid, "ciphertext with bit-reversed slots")
	case !(scale >= 1) || math.IsInf(scale, 0):
		return nil, wire.Errorf(wire.KindInvalid, "ciphertext scale must be a finite number of at least 1")
	}
	if !HeadersMatch(b, rp.N(), level) {
		return nil, wire.Errorf(wire.KindInvalid, "not a degree-1 ciphertext of the key's parameters at level %d: its headers differ (another parameter set, or not a Lattigo ciphertext)", level)
	}
	c := new(rlwe.Ciphertext)
	if _, err := c.ReadFrom(bytes.NewReader(b)); err != nil {
		return nil, wire.Errorf(wire.KindInvalid, "not a Lattigo ciphertext (MarshalBinary bytes)")
	}
	switch {
	case c.Degree() != 1:
		return nil, wire.Errorf(wire.KindInvalid, "ciphertext of degree %d: relinearize to degree 1 first", c.Degree())
	case c.N() != rp.N():
		return nil, wire.Errorf(wire.KindInvalid, "ciphertext of ring degree %d, the key's parameters have %d: another parameter set", c.N(), rp.N())
	case c.Level() != level:
		return nil, wire.Errorf(wire.KindInvalid, "ciphertext at level %d, the key's parameters have %d: another parameter set", c.Level(), rp.MaxLevel())
	}
	q := rp.Q()
	for _, poly := range c.Value {
		for i := 0; i <= c.Level(); i++ {
			for _, x := range poly.Coeffs[i] {
				if x >= q[i] {
					return nil, wire.Errorf(wire.KindInvalid, "ciphertext coefficient above modulus %d: another parameter set", i)
				}
			}
		}
	}
	return c, nil
}
