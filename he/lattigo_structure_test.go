package he

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"math"
	"testing"

	"github.com/tuneinsight/lattigo/v6/core/rlwe"
	"github.com/tuneinsight/lattigo/v6/ring/ringqp"
	"github.com/tuneinsight/lattigo/v6/schemes/bgv"
	"github.com/tuneinsight/lattigo/v6/schemes/ckks"

	"github.com/kmsd-project/kmsd/he/seedkey"
	"github.com/kmsd-project/kmsd/kms"
)

// reviewParamSets: the presets kmsd allows at logN 13 and 14 (logN 15/16
// differ only in size), and custom literals without P, which Resolve
// accepts (P and LogP are optional in literalFields).
func reviewParamSets(t *testing.T) map[string]*Params {
	out := map[string]*Params{}
	for _, n := range []string{"ckks-logn13", "ckks-logn14"} {
		out[n] = preset(t, CKKS, n)
	}
	for _, n := range []string{"bgv-logn13", "bgv-logn14"} {
		out[n] = preset(t, BGV, n)
	}
	for name, lit := range map[string]struct {
		s   Scheme
		lit string
	}{
		"ckks-noP": {CKKS, `{"LogN":13,"LogQ":[55,45,45],"LogDefaultScale":45}`},
		"bgv-noP":  {BGV, `{"LogN":13,"LogQ":[54,54,54],"PlaintextModulus":65537}`},
	} {
		p, err := Resolve(lit.s, json.RawMessage(lit.lit))
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if p.RLWE().PCount() != 0 {
			t.Fatalf("%s has P", name)
		}
		out[name] = p
	}
	return out
}

// TestKeysMatchLattigoStructure (written by an outside review): for every allowed shape of
// parameters (P present and absent), kmsd's generator makes keys of the
// same shape as rlwe.KeyGenerator (same size, same non-coefficient bytes:
// levels, gadget decomposition, Galois element, NthRoot), with the same
// noise (NTT/Montgomery domain, gadget term, automorphism direction), and
// the seeded form round-trips byte for byte through Generate's path.
func TestKeysMatchLattigoStructure(t *testing.T) {
	for name, p := range reviewParamSets(t) {
		t.Run(name, func(t *testing.T) {
			rp := p.RLWE()
			sk, err := SecretKey(rp, seed(t))
			if err != nil {
				t.Fatal(err)
			}
			g, err := newKeyGen(rp, sk)
			if err != nil {
				t.Fatal(err)
			}
			lg := rlwe.NewKeyGenerator(rp)
			var galEl uint64
			if p.Scheme == CKKS {
				galEl = p.CKKS.GaloisElementForRotation(3)
			} else {
				galEl = p.BGV.GaloisElementForColRotation(3)
			}
			s := func() *[ASeedSize]byte { x, _ := newASeed(); return x }
			pk, err := g.publicKey(s())
			if err != nil {
				t.Fatal(err)
			}
			rlk, err := g.relinearizationKey(s())
			if err != nil {
				t.Fatal(err)
			}
			gk, err := g.galoisKey(galEl, s(), nil)
			if err != nil {
				t.Fatal(err)
			}
			lpk, lrlk, lgk := lg.GenPublicKeyNew(sk), lg.GenRelinearizationKeyNew(sk), lg.GenGaloisKeyNew(galEl, sk)

			// Same shape: equal sizes, equal bytes once every coefficient is zeroed.
			shape := func(k seedkey.Key) []byte {
				var c seedkey.Key
				switch k := k.(type) {
				case *rlwe.PublicKey:
					x := k.CopyNew()
					for i := range x.Value {
						zero(x.Value[i])
					}
					c = x
				case *rlwe.RelinearizationKey:
					x := k.CopyNew()
					for _, e := range seedkey.GadgetEntries(&x.GadgetCiphertext) {
						zero(*e[0])
						zero(*e[1])
					}
					c = x
				case *rlwe.GaloisKey:
					x := k.CopyNew()
					for _, e := range seedkey.GadgetEntries(&x.GadgetCiphertext) {
						zero(*e[0])
						zero(*e[1])
					}
					c = x
				}
				b, err := c.MarshalBinary()
				if err != nil {
					t.Fatal(err)
				}
				return b
			}
			for what, pair := range map[string][2]seedkey.Key{"public": {pk, lpk}, "relinearization": {rlk, lrlk}, "galois": {gk, lgk}} {
				if !bytes.Equal(shape(pair[0]), shape(pair[1])) {
					t.Errorf("%s key: kmsd's and Lattigo's keys differ in structure", what)
				}
			}
			// Same noise (same domains, same gadget term, same automorphism).
			for what, pair := range map[string][2]float64{
				"public":          {rlwe.NoisePublicKey(pk, sk, rp), rlwe.NoisePublicKey(lpk, sk, rp)},
				"relinearization": {rlwe.NoiseRelinearizationKey(rlk, sk, rp), rlwe.NoiseRelinearizationKey(lrlk, sk, rp)},
				"galois":          {rlwe.NoiseGaloisKey(gk, sk, rp), rlwe.NoiseGaloisKey(lgk, sk, rp)},
			} {
				if math.IsNaN(pair[0]) || math.Abs(pair[0]-pair[1]) > 1 || pair[0] > 10 {
					t.Errorf("%s key: noise log2 %.2f, Lattigo's %.2f", what, pair[0], pair[1])
				}
			}
			// Functional: encrypt under pk, rotate with gk, multiply with rlk
			// (P-less parameters: see TestReviewNoPEvaluationKeysUnusable).
			if rp.PCount() == 0 {
				return
			}
			checkKeysWork(t, p, sk, pk, rlk, gk)
		})
	}
}

// checkKeysWork encrypts under pk, rotates by 3 with gk and squares with rlk.
func checkKeysWork(t *testing.T, p *Params, sk *rlwe.SecretKey, pk *rlwe.PublicKey, rlk *rlwe.RelinearizationKey, gk *rlwe.GaloisKey) {
	t.Helper()
	{
		{
			switch p.Scheme {
			case BGV:
				params := p.BGV
				enc := bgv.NewEncoder(params)
				x := make([]uint64, params.MaxSlots())
				for i := range x {
					x[i] = uint64(i % 97)
				}
				pt := bgv.NewPlaintext(params, params.MaxLevel())
				if err := enc.Encode(x, pt); err != nil {
					t.Fatal(err)
				}
				ct, err := rlwe.NewEncryptor(params, pk).EncryptNew(pt)
				if err != nil {
					t.Fatal(err)
				}
				ev := bgv.NewEvaluator(params, rlwe.NewMemEvaluationKeySet(rlk, gk))
				rot, err := ev.RotateColumnsNew(ct, 3)
				if err != nil {
					t.Fatal(err)
				}
				sq, err := ev.MulRelinNew(ct, ct)
				if err != nil {
					t.Fatal(err)
				}
				dec := rlwe.NewDecryptor(params, sk)
				got := make([]uint64, len(x))
				if err := enc.Decode(dec.DecryptNew(rot), got); err != nil {
					t.Fatal(err)
				}
				half := len(x) / 2
				for i := 0; i < half; i++ {
					if got[i] != x[(i+3)%half] {
						t.Fatalf("BGV rotate: slot %d is %d, want %d", i, got[i], x[(i+3)%half])
					}
				}
				if err := enc.Decode(dec.DecryptNew(sq), got); err != nil {
					t.Fatal(err)
				}
				for i := range x {
					if got[i] != x[i]*x[i]%params.PlaintextModulus() {
						t.Fatalf("BGV square: slot %d is %d", i, got[i])
					}
				}
			case CKKS:
				params := p.CKKS
				enc := ckks.NewEncoder(params)
				x := make([]float64, params.MaxSlots())
				for i := range x {
					x[i] = float64(i%7) / 8
				}
				pt := ckks.NewPlaintext(params, params.MaxLevel())
				enc.Encode(x, pt)
				ct, err := rlwe.NewEncryptor(params, pk).EncryptNew(pt)
				if err != nil {
					t.Fatal(err)
				}
				ev := ckks.NewEvaluator(params, rlwe.NewMemEvaluationKeySet(rlk, gk))
				rot, err := ev.RotateNew(ct, 3)
				if err != nil {
					t.Fatal(err)
				}
				got := make([]float64, len(x))
				if err := enc.Decode(rlwe.NewDecryptor(params, sk).DecryptNew(rot), got); err != nil {
					t.Fatal(err)
				}
				for i := range got {
					if d := got[i] - x[(i+3)%len(x)]; d > 1e-3 || d < -1e-3 {
						t.Fatalf("CKKS rotate: slot %d is %v", i, got[i])
					}
				}
			}
		}
	}
}

func zero(p ringqp.Poly) {
	for _, c := range p.Q.Coeffs {
		clear(c)
	}
	for _, c := range p.P.Coeffs {
		clear(c)
	}
}

// TestGenerateSeededNoP: Generate in the seeded form, for parameters
// without P as for presets: every blob expands to the manifest's full
// digest, and Galois keys made in one worker's reused buffer have distinct
// seeds and a halves.
func TestGenerateSeededNoP(t *testing.T) {
	for name, p := range reviewParamSets(t) {
		if p.RLWE().PCount() != 0 && name != "ckks-logn13" && name != "bgv-logn13" {
			continue
		}
		t.Run(name, func(t *testing.T) {
			rp := p.RLWE()
			sk, _ := SecretKey(rp, seed(t))
			store, err := OpenDirBlobs(t.TempDir())
			if err != nil {
				t.Fatal(err)
			}
			spec := KeySpec{Rotations: []int{1, 2, 3, 4, 5}, Relinearization: true}
			gal, err := GaloisElements(p, spec)
			if err != nil {
				t.Fatal(err)
			}
			blobs, err := Generate(context.Background(), p, sk, spec, gal, store, 1, nil, true)
			if err != nil {
				t.Fatal(err)
			}
			seeds := map[string]bool{}
			for _, b := range blobs {
				f, err := store.Open(context.Background(), b.Digest)
				if err != nil {
					t.Fatal(err)
				}
				var buf bytes.Buffer
				buf.ReadFrom(f)
				f.Close()
				raw := buf.Bytes()
				sd := string(raw[24:56])
				if seeds[sd] {
					t.Fatalf("%s key: a seed is reused", b.Kind)
				}
				seeds[sd] = true
				kind := map[string]seedkey.Kind{"public": seedkey.Public, "relinearization": seedkey.Relinearization, "galois": seedkey.Galois}[b.Kind]
				k, err := seedkey.Expand(rp, kind, raw)
				if err != nil {
					t.Fatalf("%s: %v", b.Kind, err)
				}
				full, _ := k.MarshalBinary()
				if int64(len(full)) != b.FullSize || string(Digest("sha256:"+hexSum(full))) != string(b.FullDigest) {
					t.Fatalf("%s key: the expansion is not the full form the manifest names", b.Kind)
				}
				// Keys made in the worker's reused Galois buffer are sound keys.
				if gk, ok := k.(*rlwe.GaloisKey); ok && rp.PCount() > 0 {
					if n := rlwe.NoiseGaloisKey(gk, sk, rp); math.IsNaN(n) || n > 10 || gk.GaloisElement != b.GaloisElement {
						t.Fatalf("Galois key %d: noise log2 %.1f, element %d", b.GaloisElement, n, gk.GaloisElement)
					}
				}
			}
		})
	}
}

func hexSum(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

func kmsPolicy(lit string) kms.Policy {
	return kms.Policy{Params: json.RawMessage(lit), Rotations: []int{3}, Relinearization: true}
}

func mustJSONString(b []byte) json.RawMessage {
	s, _ := json.Marshal(string(b))
	return s
}
