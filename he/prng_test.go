package he

import (
	"bytes"
	"context"
	"errors"
	"os"
	"testing"

	"github.com/tuneinsight/lattigo/v6/core/rlwe"
)

// TestUniformPRNG: fresh generators give different streams, and a stream
// looks uniform byte by byte (chi-square over 256 bins: mean 255, sd 22.6;
// 400 is more than six sd away, so this does not flake, while a stuck or
// zero stream fails by orders of magnitude).
func TestUniformPRNG(t *testing.T) {
	a, err := newUniformPRNG()
	if err != nil {
		t.Fatal(err)
	}
	b, _ := newUniformPRNG()
	x, y := make([]byte, 1<<20), make([]byte, 1<<20)
	a.Read(x)
	b.Read(y)
	if bytes.Equal(x[:64], y[:64]) {
		t.Fatal("two fresh generators gave the same stream")
	}
	var counts [256]float64
	for _, c := range x {
		counts[c]++
	}
	exp := float64(len(x)) / 256
	chi := 0.0
	for _, c := range counts {
		chi += (c - exp) * (c - exp) / exp
	}
	if chi > 400 {
		t.Fatalf("chi-square %.0f over 255 degrees of freedom: not uniform", chi)
	}
	// Reads continue the stream, whatever the buffer held before.
	z := bytes.Repeat([]byte{0xff}, 64)
	a.Read(z)
	if bytes.Equal(z, x[:64]) || bytes.Equal(z, bytes.Repeat([]byte{0xff}, 64)) {
		t.Fatal("a second read repeated the stream or left the buffer")
	}
}

// TestKeyGeneratorUsesUniformPRNG: the uniform half of a key comes from
// the PRNG given to newKeyGenerator (two generators on the same AES key
// give the same "a"), while the error half stays fresh (different "b"),
// and every uniform coefficient is reduced modulo its prime.
func TestKeyGeneratorUsesUniformPRNG(t *testing.T) {
	p := preset(t, CKKS, "ckks-logn13")
	sk, _ := SecretKey(p.RLWE(), seed(t))
	key := bytes.Repeat([]byte{7}, 32)
	gen := func() *rlwe.PublicKey {
		prng, err := uniformPRNGFromKey(key)
		if err != nil {
			t.Fatal(err)
		}
		return newKeyGenerator(p.RLWE(), prng).GenPublicKeyNew(sk)
	}
	k1, k2 := gen(), gen()
	if !k1.Value[1].Equal(&k2.Value[1]) {
		t.Fatal("same uniform PRNG, different uniform halves: the PRNG is not the one used")
	}
	if k1.Value[0].Equal(&k2.Value[0]) {
		t.Fatal("same error halves: errors must not come from the uniform PRNG")
	}
	for j, s := range p.RLWE().RingQ().SubRings {
		for _, c := range k1.Value[1].Q.Coeffs[j] {
			if c >= s.Modulus {
				t.Fatalf("coefficient %d not reduced modulo %d", c, s.Modulus)
			}
		}
	}
}

// TestGenerateFailureLeavesNothing: a generation cancelled after its first
// key returns the error and removes every file it wrote.
func TestGenerateFailureLeavesNothing(t *testing.T) {
	p := preset(t, CKKS, "ckks-logn13")
	sk, _ := SecretKey(p.RLWE(), seed(t))
	spec := KeySpec{Rotations: []int{1, 2, 4, 8}, Relinearization: true}
	gal, _ := GaloisElements(p, spec)
	dir := t.TempDir()
	store, _ := OpenDirBlobs(dir)
	ctx, cancel := context.WithCancel(context.Background())
	calls := 0
	_, err := Generate(ctx, p, sk, spec, gal, store, 2, func(done, total int, _ int64) {
		calls++
		cancel()
	})
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("Generate = %v, want context.Canceled", err)
	}
	if calls == 0 {
		t.Fatal("no key was stored before the cancel: the test cleaned up nothing")
	}
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		t.Errorf("left behind: %s", e.Name())
	}
}
