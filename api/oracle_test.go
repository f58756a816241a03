package api_test

import (
	"math"
	"strings"
	"testing"

	"github.com/tuneinsight/lattigo/v6/core/rlwe"
	"github.com/tuneinsight/lattigo/v6/schemes/ckks"

	"github.com/kmsd-project/kmsd/api/client"
	"github.com/kmsd-project/kmsd/api/client/hekeys"
	"github.com/kmsd-project/kmsd/internal/hetest"
)

// chosenEnvelope is the chosen ciphertext (0, c*X^k) of keys' version at
// a level and scale, in an envelope with every slot in use.
func chosenEnvelope(t *testing.T, keys *hekeys.Keys, level int, scale float64, c uint64, k int) *client.Envelope {
	t.Helper()
	params := keys.CKKS
	ct := rlwe.NewCiphertext(params, 1, level)
	ct.Scale = rlwe.NewScale(scale)
	ct.LogDimensions = params.LogMaxDimensions()
	ct.IsBatched = true
	for i := 0; i <= level; i++ {
		ct.Value[1].Coeffs[i][k] = c % params.Q()[i]
	}
	params.RingQ().AtLevel(level).NTT(ct.Value[1], ct.Value[1])
	ct.IsNTT = true
	env, err := keys.Seal(ct, params.MaxSlots())
	if err != nil {
		t.Fatal(err)
	}
	return env
}

// TestDecryptionIsNoKeyOracle: the review's attack through the API. The
// chosen ciphertexts (0, X^k), at every level, at scale 1 and at the
// default scale, alone or summed into an honest input, are refused without
// an attestation (the old code decrypted them, and two answers gave the
// key); with a colluding encryptor's attestation they are refused at
// scale 1, and at the default scale the two answers give a guess that is
// noise. Nothing is decrypted past the refusals, and the refused requests
// are in the audit log as unattested.
func TestDecryptionIsNoKeyOracle(t *testing.T) {
	e := newEnv(t)
	heKey(t, e, "victim", `{"name":"victim","kind":"ckks","policy":{"params":"ckks-logn13","decrypt_budget":64,"decrypt_log_precision":30}}`)
	dec, err := e.client(e.admin).CreateToken(ctx, client.CreateTokenRequest{Role: "decryptor", Keys: []string{"victim"}})
	if err != nil {
		t.Fatal(err)
	}
	d := e.client(dec.Token)
	f := &hekeys.Fetcher{BaseURL: e.url, Token: e.admin, IdentityKey: e.idPub, CacheDir: t.TempDir(), HTTP: e.httpc}
	keys, err := f.FetchPublic(ctx, "victim", 1)
	if err != nil {
		t.Fatal(err)
	}
	params := keys.CKKS
	n := params.N()
	def := math.Exp2(float64(params.LogDefaultScale()))
	honest, err := keys.Encrypt([]float64{3.14, 2.71, -1.5})
	if err != nil {
		t.Fatal(err)
	}
	before := e.snapshot()
	for level := 0; level <= params.MaxLevel(); level++ {
		for _, scale := range []float64{1, def} {
			for _, k := range []int{0, n / 2} {
				env := chosenEnvelope(t, keys, level, scale, 1, k)
				if _, err := d.Decrypt(ctx, env); client.StatusOf(err) != 400 || !strings.Contains(err.Error(), "has no attestation") {
					t.Fatalf("level %d, scale %g, X^%d: %v", level, scale, k, err)
				}
			}
		}
	}
	// Summed into an honest input (both at the top level): a new
	// ciphertext nobody attested; with the honest input's attestation it
	// is not covered.
	hct, _ := keys.Open(honest)
	sum := hct.CopyNew()
	chosen, _ := keys.Open(chosenEnvelope(t, keys, params.MaxLevel(), hct.Scale.Float64(), 1, 0))
	ckks.NewEvaluator(params, nil).Add(sum, chosen, sum)
	sumEnv, _ := keys.Seal(sum, 3)
	if _, err := d.Decrypt(ctx, sumEnv); client.StatusOf(err) != 400 || !strings.Contains(err.Error(), "has no attestation") {
		t.Fatalf("chosen term in an honest input: %v", err)
	}
	if e.snapshot() != before {
		t.Fatal("a refused decryption changed the store")
	}
	attestInput(t, e, honest)
	before = e.snapshot()
	sumEnv.Attestation = honest.Attestation
	if _, err := d.Decrypt(ctx, sumEnv); client.StatusOf(err) != 400 || !strings.Contains(err.Error(), "does not cover") {
		t.Fatalf("chosen term under the honest attestation: %v", err)
	}
	if e.snapshot() != before {
		t.Fatal("a refused decryption counted against the budget")
	}
	unattested := 0
	for _, line := range e.auditLog() {
		if strings.Contains(string(line), `"attested_op":"unattested"`) && strings.Contains(string(line), `"status":400`) {
			unattested++
		}
	}
	if want := (params.MaxLevel()+1)*4 + 1; unattested != want {
		t.Fatalf("%d refusals recorded as unattested, want %d", unattested, want)
	}
	// A colluding encryptor vouches for the chosen ciphertexts.
	for level := 0; level <= params.MaxLevel(); level++ {
		one := chosenEnvelope(t, keys, level, 1, 1, 0)
		attestInput(t, e, one)
		if _, err := d.Decrypt(ctx, one); client.StatusOf(err) != 400 || !strings.Contains(err.Error(), "noise flooding leaves") {
			t.Fatalf("attested (0, 1) at scale 1, level %d: %v", level, err)
		}
		var vals [2][]float64
		for j, k := range []int{0, n / 2} {
			env := chosenEnvelope(t, keys, level, def, 1, k)
			attestInput(t, e, env)
			v, prec, err := d.DecryptFull(ctx, env)
			if err != nil || len(v) != params.MaxSlots() || prec > 30 {
				t.Fatalf("attested (0, X^%d) at level %d: %d values, %d bits, %v", k, level, len(v), prec, err)
			}
			vals[j] = v
		}
		guess := hetest.RecoverFromChosen(params, vals[0], vals[1], def, 1)
		if hetest.IsSecret(params, keys.PublicKey, guess) {
			t.Fatalf("level %d: the attack recovered the key", level)
		}
	}
}
