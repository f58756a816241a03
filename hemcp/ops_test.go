package hemcp

import (
	"context"
	"encoding/json"
	"errors"
	"math"
	"math/rand/v2"
	"testing"

	"github.com/tuneinsight/lattigo/v6/core/rlwe"
	"github.com/tuneinsight/lattigo/v6/schemes/ckks"

	"github.com/kmsd-project/kmsd/api/client/hekeys"
	"github.com/kmsd-project/kmsd/he"
	"github.com/kmsd-project/kmsd/kms"
)

// localKeys makes a CKKS keyset in the test (real Lattigo keys, with the
// secret kept here to decrypt), with Galois keys for rotations.
func localKeys(t testing.TB, preset string, rotations []int) (*hekeys.Keys, *rlwe.SecretKey) {
	t.Helper()
	p, err := he.Resolve(he.CKKS, json.RawMessage(`"`+preset+`"`))
	if err != nil {
		t.Fatal(err)
	}
	params := p.CKKS
	kg := rlwe.NewKeyGenerator(params)
	sk, pk := kg.GenKeyPairNew()
	rlk := kg.GenRelinearizationKeyNew(sk)
	k := &hekeys.Keys{Scheme: "ckks", CKKS: params, PublicKey: pk}
	k.Manifest = kms.Manifest{Key: "k", Version: 1, Kind: "ckks", ParamsID: p.ID, RelinearizationKey: &kms.BlobRef{}}
	var gks []*rlwe.GaloisKey
	for _, r := range rotations {
		g := params.GaloisElement(r)
		gks = append(gks, kg.GenGaloisKeyNew(g, sk))
		k.Manifest.GaloisKeys = append(k.Manifest.GaloisKeys, kms.GaloisRef{GaloisElement: g})
	}
	k.EvaluationKeys = rlwe.NewMemEvaluationKeySet(rlk, gks...)
	return k, sk
}

func powersOfTwo(slots int) []int {
	var out []int
	for p := 1; p < slots; p *= 2 {
		out = append(out, p)
	}
	return out
}

func decrypt(t testing.TB, k *hekeys.Keys, sk *rlwe.SecretKey, ct *rlwe.Ciphertext, n int) []float64 {
	pt := rlwe.NewDecryptor(k.CKKS, sk).DecryptNew(ct)
	vals := make([]float64, k.CKKS.MaxSlots())
	if err := ckks.NewEncoder(k.CKKS).Decode(pt, vals); err != nil {
		t.Fatal(err)
	}
	return vals[:n]
}

func encrypt(t testing.TB, k *hekeys.Keys, v []float64) *rlwe.Ciphertext {
	env, err := k.Encrypt(v)
	if err != nil {
		t.Fatal(err)
	}
	ct, err := k.Open(env)
	if err != nil {
		t.Fatal(err)
	}
	return ct
}

// TestOpsMatchPlaintext: each operation's decryption matches the same
// computation on plaintext within ErrorBound, and the bound is not loose
// (the largest error seen is within 64x of it).
func TestOpsMatchPlaintext(t *testing.T) {
	k, sk := localKeys(t, "ckks-logn13", powersOfTwo(1<<12))
	e, err := NewEngine(k)
	if err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(1, 2))
	x := make([]float64, 100)
	for i := range x {
		x[i] = rng.Float64()*2 - 1
	}
	W := make([][]float64, 7)
	b := make([]float64, 7)
	for i := range W {
		W[i] = make([]float64, len(x))
		for j := range W[i] {
			W[i][j] = rng.Float64()*2 - 1
		}
		b[i] = rng.Float64()
	}
	ct := encrypt(t, k, x)
	y, _, err := e.Linear(context.Background(), ct, W, b)
	if err != nil {
		t.Fatal(err)
	}
	got := decrypt(t, k, sk, y, len(W))
	for i := range W {
		want := b[i]
		for j := range x {
			want += W[i][j] * x[j]
		}
		if math.Abs(got[i]-want) > 1e-3 {
			t.Fatalf("linear row %d: %v, want %v", i, got[i], want)
		}
	}
	// Polynomial: a degree-2 approximation (ckks-logn13 has two levels).
	c := []float64{0.5, 0.197, -0.004}
	pc, _, err := e.Polynomial(ct, c)
	if err != nil {
		t.Fatal(err)
	}
	got = decrypt(t, k, sk, pc, len(x))
	for i, v := range x {
		if want := c[0] + c[1]*v + c[2]*v*v; math.Abs(got[i]-want) > 1e-3 {
			t.Fatalf("polynomial slot %d: %v, want %v", i, got[i], want)
		}
	}
	// Aggregate.
	ct2 := encrypt(t, k, b)
	sum, _, err := e.Aggregate([]*rlwe.Ciphertext{ct, ct2}, true)
	if err != nil {
		t.Fatal(err)
	}
	got = decrypt(t, k, sk, sum, len(b))
	for i := range b {
		if want := (x[i] + b[i]) / 2; math.Abs(got[i]-want) > 1e-3 {
			t.Fatalf("mean slot %d: %v, want %v", i, got[i], want)
		}
	}
	// A missing rotation is named.
	k2, _ := localKeys(t, "ckks-logn13", []int{1, 2, 4})
	e2, _ := NewEngine(k2)
	_, _, err = e2.Linear(context.Background(), encrypt(t, k2, x), W, b)
	var mr *MissingRotationError
	if !errors.As(err, &mr) || mr.Key != 128 {
		t.Fatalf("linear with only rotations 1, 2, 4: %v", err)
	}
}
