package seedkey_test

import (
	"bytes"
	"errors"
	"testing"

	"github.com/tuneinsight/lattigo/v6/core/rlwe"
	"github.com/tuneinsight/lattigo/v6/ring/ringqp"
	"github.com/tuneinsight/lattigo/v6/schemes/bgv"
	"github.com/tuneinsight/lattigo/v6/schemes/ckks"

	"github.com/kmsd-project/kmsd/he/seedkey"
)

// keyWithSeed is a key of kind made by Lattigo's key generator, its a
// halves then replaced by the seed's (its b halves no longer match them:
// the seeded form carries b halves as they are, so the round trip does
// not depend on it; he's tests check keys kmsd generates work).
func keyWithSeed(t *testing.T, params rlwe.Parameters, kind seedkey.Kind, seed *[32]byte) seedkey.Key {
	t.Helper()
	kgen := rlwe.NewKeyGenerator(params)
	sk := kgen.GenSecretKeyNew()
	var k seedkey.Key
	switch kind {
	case seedkey.Public:
		pk := kgen.GenPublicKeyNew(sk)
		if err := seedkey.ExpandA(params, seed, pk.LevelQ(), pk.LevelP(), []ringqp.Poly{pk.Value[1]}); err != nil {
			t.Fatal(err)
		}
		k = pk
	case seedkey.Relinearization:
		rlk := kgen.GenRelinearizationKeyNew(sk)
		fillA(t, params, seed, &rlk.GadgetCiphertext)
		k = rlk
	case seedkey.Galois:
		gk := kgen.GenGaloisKeyNew(params.GaloisElement(3), sk)
		fillA(t, params, seed, &gk.GadgetCiphertext)
		k = gk
	case seedkey.Switching:
		evk := kgen.GenEvaluationKeyNew(sk, kgen.GenSecretKeyNew())
		fillA(t, params, seed, &evk.GadgetCiphertext)
		k = evk
	}
	return k
}

func fillA(t *testing.T, params rlwe.Parameters, seed *[32]byte, gct *rlwe.GadgetCiphertext) {
	t.Helper()
	var as []ringqp.Poly
	for _, e := range seedkey.GadgetEntries(gct) {
		as = append(as, *e[1])
	}
	if err := seedkey.ExpandA(params, seed, gct.LevelQ(), gct.LevelP(), as); err != nil {
		t.Fatal(err)
	}
}

func paramSets(t *testing.T) map[string]rlwe.Parameters {
	c, err := ckks.NewParametersFromLiteral(ckks.ParametersLiteral{LogN: 12, LogQ: []int{50, 40, 40}, LogP: []int{51}, LogDefaultScale: 40})
	if err != nil {
		t.Fatal(err)
	}
	b, err := bgv.NewParametersFromLiteral(bgv.ParametersLiteral{LogN: 12, LogQ: []int{50, 40}, LogP: []int{51}, PlaintextModulus: 65537})
	if err != nil {
		t.Fatal(err)
	}
	return map[string]rlwe.Parameters{"ckks": c.Parameters, "bgv": b.Parameters}
}

// TestRoundTrip: for every kind and both schemes, the seeded form expands
// to the key byte for byte, and is about half its size.
func TestRoundTrip(t *testing.T) {
	seed := &[32]byte{1, 2, 3}
	for name, params := range paramSets(t) {
		for _, kind := range []seedkey.Kind{seedkey.Public, seedkey.Relinearization, seedkey.Galois, seedkey.Switching} {
			k := keyWithSeed(t, params, kind, seed)
			full, _ := k.MarshalBinary()
			var b bytes.Buffer
			if err := seedkey.Encode(&b, k, seed); err != nil {
				t.Fatal(err)
			}
			if size, _ := seedkey.Size(params, kind); size != b.Len() {
				t.Fatalf("%s %s: Size %d, encoded %d", name, kind, size, b.Len())
			}
			if r := float64(b.Len()) / float64(len(full)); r > 0.51 {
				t.Errorf("%s %s: seeded %d of full %d bytes (%.3f)", name, kind, b.Len(), len(full), r)
			}
			got, err := seedkey.Expand(params, kind, b.Bytes())
			if err != nil {
				t.Fatalf("%s %s: %v", name, kind, err)
			}
			again, _ := got.MarshalBinary()
			if !bytes.Equal(again, full) {
				t.Fatalf("%s %s: the expanded key differs from the key", name, kind)
			}
		}
	}
}

// TestExpandRefuses: a seeded key of another kind, truncated or padded,
// with reserved bytes set or a Galois element on a key that has none, is
// refused before any decoding; another seed expands to another key (the
// SDK then refuses it by its digest).
func TestExpandRefuses(t *testing.T) {
	params := paramSets(t)["ckks"]
	seed := &[32]byte{9}
	k := keyWithSeed(t, params, seedkey.Galois, seed)
	var b bytes.Buffer
	seedkey.Encode(&b, k, seed)
	good := b.Bytes()
	mut := func(f func([]byte) []byte) []byte { return f(append([]byte(nil), good...)) }
	for name, c := range map[string]struct {
		b    []byte
		kind seedkey.Kind
	}{
		"another kind":       {good, seedkey.Relinearization},
		"truncated by one":   {good[:len(good)-1], seedkey.Galois},
		"truncated by seven": {good[:len(good)-7], seedkey.Galois},
		"one byte more":      {append(append([]byte(nil), good...), 0), seedkey.Galois},
		"not seeded":         {bytes.Repeat([]byte{1}, len(good)), seedkey.Galois},
		"another version":    {mut(func(b []byte) []byte { b[8] = 2; return b }), seedkey.Galois},
		"reserved set":       {mut(func(b []byte) []byte { b[12] = 1; return b }), seedkey.Galois},
		"no Galois element":  {mut(func(b []byte) []byte { clear(b[16:24]); return b }), seedkey.Galois},
		"empty":              {nil, seedkey.Galois},
	} {
		if _, err := seedkey.Expand(params, c.kind, c.b); !errors.Is(err, seedkey.ErrMalformed) {
			t.Errorf("%s: %v", name, err)
		}
	}
	other := mut(func(b []byte) []byte { b[24] ^= 1; return b }) // the seed's first byte
	k2, err := seedkey.Expand(params, seedkey.Galois, other)
	if err != nil {
		t.Fatal(err)
	}
	full, _ := k.MarshalBinary()
	if f2, _ := k2.MarshalBinary(); bytes.Equal(f2, full) {
		t.Fatal("another seed expanded to the same key")
	}
}
