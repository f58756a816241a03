package he

import (
	"bytes"
	"testing"

	"github.com/tuneinsight/lattigo/v6/core/rlwe"
	"github.com/tuneinsight/lattigo/v6/ring/ringqp"
	"github.com/tuneinsight/lattigo/v6/schemes/ckks"

	"github.com/kmsd-project/kmsd/he/seedkey"
)

// TestKeysFromSeed: a key's a halves are its seed's (another key's seed
// gives others), every coefficient is reduced modulo its prime and the
// bytes look uniform, and a key whose a halves are wiped is rebuilt byte
// for byte from its b halves and its seed.
func TestKeysFromSeed(t *testing.T) {
	p := preset(t, CKKS, "ckks-logn13")
	rp := p.RLWE()
	sk, _ := SecretKey(rp, seed(t))
	g, err := newKeyGen(rp, sk)
	if err != nil {
		t.Fatal(err)
	}
	s1, _ := newASeed()
	s2, _ := newASeed()
	if *s1 == *s2 {
		t.Fatal("two fresh seeds are equal")
	}
	gal := p.CKKS.GaloisElementForRotation(1)
	k1, err := g.galoisKey(gal, s1, nil)
	if err != nil {
		t.Fatal(err)
	}
	k1b, _ := g.galoisKey(gal, s1, nil)
	k2, _ := g.galoisKey(gal, s2, nil)
	a := func(k *rlwe.GaloisKey) ringqp.Poly { return k.Value[0][0][1] }
	b := func(k *rlwe.GaloisKey) ringqp.Poly { return k.Value[0][0][0] }
	if !a(k1).Equal(ptr(a(k1b))) || a(k1).Equal(ptr(a(k2))) {
		t.Fatal("the a halves do not follow the seed")
	}
	if b(k1).Equal(ptr(b(k1b))) {
		t.Fatal("two keys of one seed have the same b halves: the errors must be fresh")
	}
	var counts [16]float64
	n := 0
	for l, q := range rp.RingQ().ModuliChain() {
		for _, c := range a(k1).Q.Coeffs[l] {
			if c >= q {
				t.Fatalf("coefficient %d not below %d", c, q)
			}
			counts[c*16/q]++
			n++
		}
	}
	chi := 0.0
	for _, c := range counts {
		exp := float64(n) / 16
		chi += (c - exp) * (c - exp) / exp
	}
	if chi > 60 { // 15 degrees of freedom: mean 15, sd 5.5
		t.Fatalf("chi-square %.0f over 16 bins: the a halves are not uniform", chi)
	}
	full, _ := k1.MarshalBinary()
	for _, e := range aHalves(&k1.GadgetCiphertext) {
		for _, c := range append(e.Q.Coeffs, e.P.Coeffs...) {
			clear(c)
		}
	}
	if err := seedkey.ExpandA(rp, s1, k1.LevelQ(), k1.LevelP(), aHalves(&k1.GadgetCiphertext)); err != nil {
		t.Fatal(err)
	}
	if again, _ := k1.MarshalBinary(); !bytes.Equal(again, full) {
		t.Fatal("the key rebuilt from its seed differs from the key")
	}
}

func ptr[T any](v T) *T { return &v }

// TestGeneratedKeysWork: the keys made here are Lattigo keys: the public
// key encrypts what the secret key decrypts, the relinearization key
// squares, the Galois key rotates, and a switching key moves a ciphertext
// to another secret key.
func TestGeneratedKeysWork(t *testing.T) {
	p := preset(t, CKKS, "ckks-logn13")
	rp := p.RLWE()
	sk, _ := SecretKey(rp, seed(t))
	g, _ := newKeyGen(rp, sk)
	s := func() *[ASeedSize]byte { x, _ := newASeed(); return x }
	pk, err := g.publicKey(s())
	if err != nil {
		t.Fatal(err)
	}
	rlk, _ := g.relinearizationKey(s())
	gk, _ := g.galoisKey(p.CKKS.GaloisElementForRotation(1), s(), nil)
	params := p.CKKS
	enc := ckks.NewEncoder(params)
	slots := params.MaxSlots()
	x := make([]float64, slots)
	for i := range x {
		x[i] = float64(i%7) / 8
	}
	pt := ckks.NewPlaintext(params, params.MaxLevel())
	enc.Encode(x, pt)
	ct, err := rlwe.NewEncryptor(params, pk).EncryptNew(pt)
	if err != nil {
		t.Fatal(err)
	}
	eval := ckks.NewEvaluator(params, rlwe.NewMemEvaluationKeySet(rlk, gk))
	sq, err := eval.MulRelinNew(ct, ct)
	if err != nil {
		t.Fatal(err)
	}
	rot, err := eval.RotateNew(ct, 1)
	if err != nil {
		t.Fatal(err)
	}
	dec := rlwe.NewDecryptor(params, sk)
	check := func(what string, c *rlwe.Ciphertext, want func(i int) float64) {
		t.Helper()
		got := make([]float64, slots)
		if err := enc.Decode(dec.DecryptNew(c), got); err != nil {
			t.Fatal(err)
		}
		for i := range got {
			if d := got[i] - want(i); d > 1e-4 || d < -1e-4 {
				t.Fatalf("%s: slot %d is %v, want %v", what, i, got[i], want(i))
			}
		}
	}
	check("encrypt", ct, func(i int) float64 { return x[i] })
	check("square", sq, func(i int) float64 { return x[i] * x[i] })
	check("rotate", rot, func(i int) float64 { return x[(i+1)%slots] })

	sk2, _ := SecretKey(rp, append([]byte{1}, seed(t)[1:]...))
	g2, _ := newKeyGen(rp, sk2)
	swk, err := g2.switchingKey(sk, s())
	if err != nil {
		t.Fatal(err)
	}
	moved, err := eval.ApplyEvaluationKeyNew(ct, swk)
	if err != nil {
		t.Fatal(err)
	}
	dec = rlwe.NewDecryptor(params, sk2)
	check("switched to another key", moved, func(i int) float64 { return x[i] })
}
