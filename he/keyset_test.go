package he

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"io"
	"math"
	"testing"

	"github.com/tuneinsight/lattigo/v6/core/rlwe"
	"github.com/tuneinsight/lattigo/v6/schemes/bgv"
	"github.com/tuneinsight/lattigo/v6/schemes/ckks"
)

func preset(t *testing.T, s Scheme, name string) *Params {
	t.Helper()
	p, err := Resolve(s, json.RawMessage(`"`+name+`"`))
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func seed(t *testing.T) []byte {
	b := make([]byte, SeedSize)
	rand.Read(b)
	return b
}

func TestSecretKeyFromSeed(t *testing.T) {
	p := preset(t, CKKS, "ckks-logn13")
	s := seed(t)
	a, err := SecretKey(p.RLWE(), s)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := SecretKey(p.RLWE(), s)
	if !a.Equal(b) {
		t.Fatal("the same seed gave two secret keys")
	}
	s2 := bytes.Clone(s)
	s2[0] ^= 1
	c, _ := SecretKey(p.RLWE(), s2)
	if a.Equal(c) {
		t.Fatal("two seeds gave one secret key")
	}
	if _, err := SecretKey(p.RLWE(), s[:31]); err == nil {
		t.Fatal("a 31-byte seed was accepted")
	}
}

// loadKeys reads the blobs back as Lattigo keys, checking each digest.
func loadKeys(t *testing.T, store Blobs, p *Params, blobs []Blob) (*rlwe.PublicKey, *rlwe.MemEvaluationKeySet) {
	t.Helper()
	var pk *rlwe.PublicKey
	var rlk *rlwe.RelinearizationKey
	var gks []*rlwe.GaloisKey
	for _, b := range blobs {
		f, err := store.Open(context.Background(), b.Digest)
		if err != nil {
			t.Fatal(err)
		}
		data, _ := io.ReadAll(f)
		f.Close()
		sum := sha256.Sum256(data)
		if "sha256:"+hex.EncodeToString(sum[:]) != string(b.Digest) || int64(len(data)) != b.Size {
			t.Fatalf("%s blob does not match its digest or size", b.Kind)
		}
		switch b.Kind {
		case "public":
			pk = rlwe.NewPublicKey(p.RLWE())
			if err := pk.UnmarshalBinary(data); err != nil {
				t.Fatal(err)
			}
		case "relinearization":
			rlk = rlwe.NewRelinearizationKey(p.RLWE())
			if err := rlk.UnmarshalBinary(data); err != nil {
				t.Fatal(err)
			}
		case "galois":
			gk := rlwe.NewGaloisKey(p.RLWE())
			if err := gk.UnmarshalBinary(data); err != nil {
				t.Fatal(err)
			}
			if gk.GaloisElement != b.GaloisElement {
				t.Fatalf("galois blob for %d holds %d", b.GaloisElement, gk.GaloisElement)
			}
			gks = append(gks, gk)
		}
	}
	return pk, rlwe.NewMemEvaluationKeySet(rlk, gks...)
}

// TestCKKSKeysetWorks: keys generated in parallel and streamed to the blob
// store encrypt, multiply, relinearize and rotate correctly.
func TestCKKSKeysetWorks(t *testing.T) {
	p := preset(t, CKKS, "ckks-logn13")
	sk, _ := SecretKey(p.RLWE(), seed(t))
	spec := KeySpec{Rotations: []int{1, 2, 4}, Relinearization: true}
	gal, err := GaloisElements(p, spec)
	if err != nil {
		t.Fatal(err)
	}
	store, err := OpenDirBlobs(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	var last int
	blobs, err := Generate(context.Background(), p, sk, spec, gal, store, 2, func(done, total int, _ int64) { last = done }, false)
	if err != nil {
		t.Fatal(err)
	}
	if len(blobs) != 5 || last != 5 || blobs[0].Kind != "public" || blobs[1].Kind != "relinearization" {
		t.Fatalf("blobs %+v", blobs)
	}
	var total int64
	for _, b := range blobs {
		total += b.Size
	}
	if est := EstimateSize(p, spec, gal); est != total {
		t.Fatalf("estimated %d bytes, wrote %d", est, total)
	}
	pk, evk := loadKeys(t, store, p, blobs)

	params := p.CKKS
	enc := ckks.NewEncoder(params)
	values := make([]float64, params.MaxSlots())
	for i := range values {
		values[i] = float64(i%17) / 8
	}
	pt := ckks.NewPlaintext(params, params.MaxLevel())
	if err := enc.Encode(values, pt); err != nil {
		t.Fatal(err)
	}
	ct, err := rlwe.NewEncryptor(params, pk).EncryptNew(pt)
	if err != nil {
		t.Fatal(err)
	}
	eval := ckks.NewEvaluator(params, evk)
	sq, err := eval.MulRelinNew(ct, ct)
	if err != nil {
		t.Fatal(err)
	}
	if err := eval.Rescale(sq, sq); err != nil {
		t.Fatal(err)
	}
	rot, err := eval.RotateNew(sq, 2)
	if err != nil {
		t.Fatal(err)
	}
	got := make([]float64, params.MaxSlots())
	if err := enc.Decode(rlwe.NewDecryptor(params, sk).DecryptNew(rot), got); err != nil {
		t.Fatal(err)
	}
	for i := range got {
		want := values[(i+2)%len(values)] * values[(i+2)%len(values)]
		if math.Abs(got[i]-want) > 1e-3 {
			t.Fatalf("slot %d: %f, want %f", i, got[i], want)
		}
	}
}

func TestBGVKeysetWorks(t *testing.T) {
	p := preset(t, BGV, "bgv-logn13")
	sk, _ := SecretKey(p.RLWE(), seed(t))
	spec := KeySpec{Rotations: []int{1}, Relinearization: true, Conjugation: true}
	gal, err := GaloisElements(p, spec)
	if err != nil || len(gal) != 2 {
		t.Fatalf("galois elements %v %v", gal, err)
	}
	store, _ := OpenDirBlobs(t.TempDir())
	blobs, err := Generate(context.Background(), p, sk, spec, gal, store, 0, nil, false)
	if err != nil {
		t.Fatal(err)
	}
	pk, evk := loadKeys(t, store, p, blobs)
	params := p.BGV
	enc := bgv.NewEncoder(params)
	values := make([]uint64, params.MaxSlots())
	for i := range values {
		values[i] = uint64(i % 100)
	}
	pt := bgv.NewPlaintext(params, params.MaxLevel())
	enc.Encode(values, pt)
	ct, _ := rlwe.NewEncryptor(params, pk).EncryptNew(pt)
	eval := bgv.NewEvaluator(params, evk)
	sq, err := eval.MulRelinNew(ct, ct)
	if err != nil {
		t.Fatal(err)
	}
	rot, err := eval.RotateColumnsNew(sq, 1)
	if err != nil {
		t.Fatal(err)
	}
	got := make([]uint64, params.MaxSlots())
	enc.Decode(rlwe.NewDecryptor(params, sk).DecryptNew(rot), got)
	half := len(values) / 2
	for i := 0; i < half; i++ {
		j := (i+1)%half + 0
		if want := values[j] * values[j] % params.PlaintextModulus(); got[i] != want {
			t.Fatalf("slot %d: %d, want %d", i, got[i], want)
		}
	}
}

func TestGaloisElementRefusals(t *testing.T) {
	p := preset(t, CKKS, "ckks-logn13")
	for _, spec := range []KeySpec{{Rotations: []int{0}}, {Rotations: []int{1 << 12}}, {Rotations: []int{-(1 << 12)}}, {Rotations: []int{3, 3}}} {
		var pe *ErrParams
		if _, err := GaloisElements(p, spec); !errors.As(err, &pe) {
			t.Errorf("rotations %v: %v", spec.Rotations, err)
		}
	}
}
