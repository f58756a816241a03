package he

import (
	"encoding/json"
	"fmt"
	"github.com/kmsd-project/kmsd/he/ciphertext"
	"math"
	"strings"
	"testing"

	"github.com/tuneinsight/lattigo/v6/core/rlwe"
	"github.com/tuneinsight/lattigo/v6/schemes/ckks"

	"github.com/kmsd-project/kmsd/internal/hetest"
	"github.com/kmsd-project/kmsd/kms"
)

// floodSetup is a ckks-logn13 version held here: its manifest, its secret
// key (as kmsd derives it from a seed) and its public key.
func floodSetup(t testing.TB) (*Kind, []byte, ckks.Parameters, kms.PrivateKey, *rlwe.PublicKey) {
	return versionOf(t, "ckks-logn13")
}

// versionOf is floodSetup for a preset.
func versionOf(t testing.TB, preset string) (*Kind, []byte, ckks.Parameters, kms.PrivateKey, *rlwe.PublicKey) {
	t.Helper()
	k := &Kind{scheme: CKKS}
	p, err := Resolve(CKKS, json.RawMessage(`"`+preset+`"`))
	if err != nil {
		t.Fatal(err)
	}
	lit, _ := json.Marshal(string(p.JSON))
	man, _ := json.Marshal(kms.Manifest{Key: "k", Version: 1, Kind: "ckks", ParamsID: p.ID, Params: lit, GaloisKeys: []kms.GaloisRef{}})
	seed := kms.NewSecret(make([]byte, 32))
	for i := range seed.Reveal() {
		seed.Reveal()[i] = byte(i)
	}
	priv, err := k.LoadSecret(seed, man)
	if err != nil {
		t.Fatal(err)
	}
	pk := rlwe.NewKeyGenerator(p.CKKS).GenPublicKeyNew(priv.(secretKey).sk)
	return k, man, p.CKKS, priv, pk
}

// chosen is the ciphertext (0, c*X^k) at a level and scale.
func chosen(params ckks.Parameters, level int, scale float64, c uint64, k int) *rlwe.Ciphertext {
	ct := rlwe.NewCiphertext(params, 1, level)
	ct.Scale = rlwe.NewScale(scale)
	ct.LogDimensions = params.LogMaxDimensions()
	ct.IsBatched = true
	r := params.RingQ().AtLevel(level)
	for i := 0; i <= level; i++ {
		ct.Value[1].Coeffs[i][k] = c % params.Q()[i]
	}
	r.NTT(ct.Value[1], ct.Value[1])
	ct.IsNTT = true
	return ct
}

// decryptBefore is what kmsd's decryption did before flooding: decrypt,
// then round with DecodePublic (at the largest precision it allowed).
func decryptBefore(params ckks.Parameters, priv kms.PrivateKey, ct *rlwe.Ciphertext) []float64 {
	pt := rlwe.NewDecryptor(params, priv.(secretKey).sk).DecryptNew(ct)
	vals := make([]float64, params.MaxSlots())
	if err := ckks.NewEncoder(params).DecodePublic(pt, vals, 52); err != nil {
		panic(err)
	}
	return vals
}

// TestChosenCiphertextRecovery: the review's attack. Without flooding, the
// two chosen ciphertexts (0, 1) and (0, X^(N/2)) at scale 1 give the
// secret key exactly; with it, they are refused at scale 1 (no precision
// is left), and at the default scale, with a chosen term as large as an
// honest encryption's noise, the guess is noise.
func TestChosenCiphertextRecovery(t *testing.T) {
	k, man, params, priv, pk := floodSetup(t)
	n := params.N()
	fresh, err := k.NoiseBound(man, params.MaxLevel(), nil, 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	// The attack works on the old path: it recovers a ternary s.
	top := params.MaxLevel()
	v1 := decryptBefore(params, priv, chosen(params, top, 1, 1, 0))
	v2 := decryptBefore(params, priv, chosen(params, top, 1, 1, n/2))
	guess := hetest.RecoverFromChosen(params, v1, v2, 1, 1)
	if len(v1) != params.MaxSlots() || !hetest.IsSecret(params, pk, guess) {
		t.Fatalf("the attack does not recover the key without flooding (%d values, %.3f ternary): the test would prove nothing", len(v1), hetest.TernaryFraction(guess))
	}
	// A ciphertext marked as coefficient-encoded would have its
	// plaintext's coefficients returned: refused.
	raw := chosen(params, top, 1, 1, 0)
	raw.IsBatched = false
	b, _ := raw.MarshalBinary()
	if _, err := ParseCiphertext(params.Parameters, b); kms.KindOf(err) != kms.KindInvalid || !strings.Contains(err.Error(), "not slot-encoded") {
		t.Fatalf("a coefficient-encoded ciphertext: %v", err)
	}
	// Scale 1, every level: refused before anything is decrypted.
	for level := 0; level <= top; level++ {
		_, err := k.DecryptPlan(man, chosen(params, level, 1, 1, 0), fresh, 2, 16)
		if kms.KindOf(err) != kms.KindInvalid || !strings.Contains(err.Error(), "noise flooding leaves") {
			t.Fatalf("level %d, scale 1: %v", level, err)
		}
	}
	// The default scale, every level, chosen terms up to the attested
	// noise bound: decrypted, and the guess is noise.
	scale := math.Exp2(float64(params.LogDefaultScale()))
	for level := 0; level <= top; level++ {
		for _, c := range []float64{1, math.Exp2(math.Floor(fresh))} {
			var vals [2][]float64
			for j, shift := range []int{0, n / 2} {
				ct := chosen(params, level, scale, uint64(c), shift)
				plan, err := k.DecryptPlan(man, ct, fresh, 2, MaxDecryptLogPrecision)
				if err != nil {
					t.Fatalf("level %d: %v", level, err)
				}
				out, err := k.Decrypt(priv, man, ct, plan)
				if err != nil {
					t.Fatal(err)
				}
				vals[j] = out.([]float64)
			}
			guess := hetest.RecoverFromChosen(params, vals[0], vals[1], scale, c)
			if hetest.IsSecret(params, pk, guess) {
				t.Fatalf("level %d, chosen term %g: the key is recovered after flooding", level, c)
			}
			// Without flooding, at the rounding the old path allowed, the
			// same queries give the key once the chosen term shows.
			if c > 1 {
				b1 := decryptBefore(params, priv, chosen(params, level, scale, uint64(c), 0))
				b2 := decryptBefore(params, priv, chosen(params, level, scale, uint64(c), n/2))
				if !hetest.IsSecret(params, pk, hetest.RecoverFromChosen(params, b1, b2, scale, c)) {
					t.Fatalf("level %d: without flooding the chosen term %g does not give the key: the test would prove nothing", level, c)
				}
			}
		}
	}
}

// TestFloodingHidesHonestNoise: the passive attack (Li-Micciancio) reads
// an honest ciphertext's noise off its decryption. At the highest
// precision a policy may ask for and a budget of one decryption, the
// values returned differ from the exact decryption by a noise that does
// not follow it: the correlation between the returned error and the
// ciphertext's own error, over all slots, is below 0.1 (it is 1 on the old
// path).
func TestFloodingHidesHonestNoise(t *testing.T) {
	k, man, params, priv, pk := floodSetup(t)
	vals := make([]float64, params.MaxSlots())
	for i := range vals {
		vals[i] = math.Sin(float64(i)) * 3
	}
	pt := ckks.NewPlaintext(params, params.MaxLevel())
	if err := ckks.NewEncoder(params).Encode(vals, pt); err != nil {
		t.Fatal(err)
	}
	ct, err := rlwe.NewEncryptor(params, pk).EncryptNew(pt)
	if err != nil {
		t.Fatal(err)
	}
	fresh, _ := k.NoiseBound(man, ct.Level(), nil, 0, 0)
	plan, err := k.DecryptPlan(man, ct, fresh, 1, MaxDecryptLogPrecision)
	if err != nil {
		t.Fatal(err)
	}
	out, err := k.Decrypt(priv, man, ct, plan)
	if err != nil {
		t.Fatal(err)
	}
	got := out.([]float64)
	// The ciphertext's own error in each slot, from an unrounded decryption.
	exact := make([]float64, params.MaxSlots())
	dpt := rlwe.NewDecryptor(params, priv.(secretKey).sk).DecryptNew(ct)
	if err := ckks.NewEncoder(params).Decode(dpt, exact); err != nil {
		t.Fatal(err)
	}
	before := decryptBefore(params, priv, ct)
	corr := func(a []float64) float64 {
		var sxy, sxx, syy float64
		for i := range a {
			x, y := a[i]-vals[i], exact[i]-vals[i]
			sxy += x * y
			sxx += x * x
			syy += y * y
		}
		return sxy / math.Sqrt(sxx*syy)
	}
	if c := corr(before); c < 0.99 {
		t.Fatalf("the old path's error follows the ciphertext's with correlation %.3f only: the test would prove nothing", c)
	}
	if c := corr(got); math.Abs(c) > 0.1 {
		t.Fatalf("after flooding the returned error follows the ciphertext's with correlation %.3f", c)
	}
	// And the precision returned holds: every value within 2^-p.
	for i := range got {
		if math.Abs(got[i]-vals[i]) > math.Ldexp(1, -plan.Precision) {
			t.Fatalf("slot %d: %v, want %v within 2^-%d", i, got[i], vals[i], plan.Precision)
		}
	}
	t.Logf("precision after flooding, fresh input, one decryption: %d bits", plan.Precision)
}

// BenchmarkDecrypt: a CKKS decryption of a fresh public-key encryption at
// the top level, per preset, as kmsd did before (decrypt, DecodePublic)
// and with noise flooding for a budget of 16 and of 4096 (no budget)
// decryptions; "bits" is the precision flooding leaves (0 before: the
// rounding was the policy's).
//
//	go test -run '^$' -bench BenchmarkDecrypt -benchtime 20x ./he
func BenchmarkDecrypt(b *testing.B) {
	for _, preset := range []string{"ckks-logn13", "ckks-logn14", "ckks-logn15", "ckks-logn16"} {
		k, man, params, priv, pk := versionOf(b, preset)
		vals := make([]float64, params.MaxSlots())
		for i := range vals {
			vals[i] = math.Sin(float64(i))
		}
		pt := ckks.NewPlaintext(params, params.MaxLevel())
		ckks.NewEncoder(params).Encode(vals, pt)
		ct, _ := rlwe.NewEncryptor(params, pk).EncryptNew(pt)
		fresh, _ := k.NoiseBound(man, ct.Level(), nil, 0, 0)
		b.Run(preset+"/before", func(b *testing.B) {
			for range b.N {
				decryptBefore(params, priv, ct)
			}
			b.ReportMetric(0, "bits")
		})
		for _, budget := range []uint64{16, kms.EffectiveDecryptBudget(0)} {
			plan, err := k.DecryptPlan(man, ct, fresh, budget, MaxDecryptLogPrecision)
			if err != nil {
				b.Fatal(err)
			}
			b.Run(fmt.Sprintf("%s/flooded-Q%.0f", preset, plan.Queries), func(b *testing.B) {
				for range b.N {
					if _, err := k.Decrypt(priv, man, ct, plan); err != nil {
						b.Fatal(err)
					}
				}
				b.ReportMetric(float64(plan.Precision), "bits")
			})
		}
	}
}

// TestParseCiphertextHostileHeaders: bytes of the right size whose
// headers would make Lattigo allocate without bound (a vector length of
// 2^43: the process died of out-of-memory) or shift by a negative amount
// (LogDimensions 0xff: a panic that killed kmsd-mcp), or whose metadata
// says coefficients, Montgomery form or fewer slots, are refused before
// Lattigo reads them.
func TestParseCiphertextHostileHeaders(t *testing.T) {
	_, _, params, _, pk := floodSetup(t)
	pt := ckks.NewPlaintext(params, params.MaxLevel())
	ckks.NewEncoder(params).Encode([]float64{1, 2}, pt)
	ct, err := rlwe.NewEncryptor(params, pk).EncryptNew(pt)
	if err != nil {
		t.Fatal(err)
	}
	good, _ := ct.MarshalBinary()
	if _, err := ParseCiphertext(params.Parameters, good); err != nil {
		t.Fatalf("an honest ciphertext: %v", err)
	}
	// The computed layout is Lattigo's, at every level.
	for level := 0; level <= params.MaxLevel(); level++ {
		c := rlwe.NewCiphertext(params, 1, level)
		b, _ := c.MarshalBinary()
		if len(b) != ciphertext.Size(params.N(), level) || !ciphertext.HeadersMatch(b, params.N(), level) {
			t.Fatalf("level %d: Lattigo writes %d bytes, the layout says %d", level, len(b), ciphertext.Size(params.N(), level))
		}
	}
	meta := func(from, to string) []byte {
		b := append([]byte(nil), good...)
		m := string(b[1 : 1+ciphertext.MetaSize])
		if !strings.Contains(m, from) || len(from) != len(to) {
			t.Fatalf("metadata %s has no %s", m, from)
		}
		copy(b[1:1+ciphertext.MetaSize], strings.Replace(m, from, to, 1))
		return b
	}
	huge := append([]byte(nil), good...)
	for i, x := range []byte{0, 0, 0, 0, 0, 8, 0, 0} { // 1<<43, little-endian
		huge[1+ciphertext.MetaSize+i] = x
	}
	for name, b := range map[string][]byte{
		"vector length 2^43":    huge,
		"LogDimensions 0xff":    meta(`"LogDimensions":["0x00","0x0c"]`, `"LogDimensions":["0x00","0xff"]`),
		"fewer slots":           meta(`"LogDimensions":["0x00","0x0c"]`, `"LogDimensions":["0x00","0x0b"]`),
		"coefficient-encoded":   meta(`"IsBatched":"0x01"`, `"IsBatched":"0x00"`),
		"Montgomery form":       meta(`"IsMontgomery":"0x00"`, `"IsMontgomery":"0x01"`),
		"not in the NTT domain": meta(`"IsNTT":"0x01"`, `"IsNTT":"0x00"`),
		"no metadata flag":      append([]byte{0}, good[1:]...),
	} {
		if _, err := ParseCiphertext(params.Parameters, b); kms.KindOf(err) != kms.KindInvalid {
			t.Errorf("%s: %v", name, err)
		}
	}
}

// TestNoiseBoundRefusesTheUndecryptable: a declared evaluation whose bound
// exceeds what its level holds is refused (a chain of evaluations at the
// largest amplification overflowed to +Inf, and attest answered 500).
func TestNoiseBoundRefusesTheUndecryptable(t *testing.T) {
	k, man, params, _, _ := floodSetup(t)
	e, err := k.NoiseBound(man, params.MaxLevel(), nil, 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 20 && err == nil; i++ {
		e, err = k.NoiseBound(man, 0, []float64{e}, 1<<40, 0)
	}
	if kms.KindOf(err) != kms.KindInvalid || !strings.Contains(err.Error(), "more than a ciphertext at level 0 holds") {
		t.Fatalf("a chain of amplifications by 2^40: %v, %v", e, err)
	}
	for _, bad := range []float64{math.Inf(1), math.NaN(), 1e308} {
		if _, err := k.NoiseBound(man, 0, []float64{bad}, 1, 0); kms.KindOf(err) != kms.KindInvalid {
			t.Errorf("input bound %v: %v", bad, err)
		}
	}
}
