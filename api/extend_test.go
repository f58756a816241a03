package api_test

import (
	"bytes"
	"encoding/json"
	"fmt"
	"math"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/tuneinsight/lattigo/v6/core/rlwe"
	"github.com/tuneinsight/lattigo/v6/schemes/bgv"
	"github.com/tuneinsight/lattigo/v6/schemes/ckks"

	"github.com/kmsd-project/kmsd/api/client"
	"github.com/kmsd-project/kmsd/api/client/hekeys"
	"github.com/kmsd-project/kmsd/kms"
)

// TestGaloisKeysOnDemand: a worker asks for rotations a version lacks;
// kmsd generates them once, lists them in a signed extension (the
// manifest's bytes do not change), reuses them afterwards, and refuses
// what is past its limits or not its caller's to ask. The keys rotate a
// ciphertext that kmsd then decrypts to the rotated values.
func TestGaloisKeysOnDemand(t *testing.T) {
	e := newEnv(t)
	admin := e.client(e.admin)
	heKey(t, e, "od", `{"name":"od","kind":"ckks","policy":{"params":"ckks-logn13","rotations":[1],"on_demand_galois_keys":4,"decrypt_budget":16}}`)
	worker, _ := admin.CreateToken(ctx, client.CreateTokenRequest{Role: "worker", Keys: []string{"od"}})
	wc := e.client(worker.Token)
	_, _, manifestBefore := e.raw("GET", "/v1/keys/od/versions/1/evaluation-keys", e.admin, "", "")

	// No extension yet: 204.
	if st, _, b := e.raw("GET", "/v1/keys/od/versions/1/evaluation-keys/extension", worker.Token, "", ""); st != http.StatusNoContent {
		t.Fatalf("extension before any request: %d %s", st, b)
	}
	res, op, err := wc.GaloisKeys(ctx, "od", 1, client.GaloisKeysRequest{Rotations: []int{1, 3, -2}})
	if err != nil || op != nil {
		t.Fatal(err, op)
	}
	if res.Generated != 2 || len(res.GaloisKeys) != 3 || res.ExtensionSequence != 1 || res.Version != 1 {
		t.Fatalf("first request: %+v", res)
	}
	// The same again: nothing generated, the same blobs.
	again, _, err := wc.GaloisKeys(ctx, "od", 0, client.GaloisKeysRequest{Rotations: []int{-2, 3}})
	if err != nil || again.Generated != 0 || again.ExtensionSequence != 1 {
		t.Fatalf("second request: %+v %v", again, err)
	}
	for _, g := range again.GaloisKeys {
		if !slices.ContainsFunc(res.GaloisKeys, func(h client.GaloisRef) bool { return h == g }) {
			t.Fatalf("a second request got another key for element %d", g.GaloisElement)
		}
	}
	if _, _, m := e.raw("GET", "/v1/keys/od/versions/1/evaluation-keys", e.admin, "", ""); !bytes.Equal(m, manifestBefore) {
		t.Fatal("the manifest changed")
	}
	// Refusals, each changing nothing.
	for _, c := range []struct {
		token, body string
		status      int
		says        string
	}{
		{worker.Token, `{"rotations":[5,6,7]}`, 409, "past the key's limit of 4"},
		{worker.Token, `{"rotations":[4096]}`, 400, "rotation 4096 is outside"},
		{worker.Token, `{"rotations":[2,2]}`, 400, "listed twice"},
		{worker.Token, `{}`, 400, "at least one rotation"},
		{worker.Token, `{"rotations":[` + strings.TrimSuffix(strings.Repeat("1,", 65), ",") + `]}`, 400, "at most 64"},
		{worker.Token, `{"rotations":[1],"x":1}`, 400, ""},
		{mustToken(t, e, "decryptor", "od"), `{"rotations":[5]}`, 403, ""},
		{mustToken(t, e, "encryptor", "od"), `{"rotations":[5]}`, 403, ""},
		{mustToken(t, e, "worker", "other"), `{"rotations":[5]}`, 403, ""},
	} {
		st, _, b := e.raw("POST", "/v1/keys/od/versions/1/evaluation-keys", c.token, "application/json", c.body)
		if st != c.status || !strings.Contains(string(b), c.says) {
			t.Errorf("%s: %d %s, want %d %q", c.body, st, b, c.status, c.says)
		}
	}
	// The SDK verifies the extension and loads the keys lazily.
	f := &hekeys.Fetcher{BaseURL: e.url, Token: worker.Token, IdentityKey: e.idPub, CacheDir: t.TempDir(), HTTP: e.httpc}
	keys, err := f.FetchLazy(ctx, "od", 1)
	if err != nil {
		t.Fatal(err)
	}
	if ext := keys.Extension(); ext == nil || ext.Sequence != 1 || len(ext.GaloisKeys) != 2 {
		t.Fatalf("extension: %+v", ext)
	}
	if len(keys.EvaluationKeys.GetGaloisKeysList()) != 0 {
		t.Fatal("FetchLazy loaded Galois keys")
	}
	if _, err := f.GaloisKeys(ctx, keys, []int{4}, false, false); err == nil || !strings.Contains(err.Error(), "ask kmsd to generate") {
		t.Fatalf("a missing key without generate: %v", err)
	}
	gks, err := f.GaloisKeys(ctx, keys, []int{3, 4}, false, true) // 4 is made now
	if err != nil || len(gks) != 2 {
		t.Fatal(len(gks), err)
	}
	if ext := keys.Extension(); ext.Sequence != 2 || len(ext.GaloisKeys) != 3 {
		t.Fatalf("extension after generate: %+v", ext)
	}
	// The on-demand keys rotate: kmsd decrypts the result to the values
	// rotated by 3 then 4.
	params := keys.CKKS
	values := make([]float64, params.MaxSlots())
	for i := range values {
		values[i] = float64(i%17)/8 - 1
	}
	in, err := keys.Encrypt(values)
	if err != nil {
		t.Fatal(err)
	}
	attestInput(t, e, in)
	ct, _ := keys.Open(in)
	eval := ckks.NewEvaluator(params, rlwe.NewMemEvaluationKeySet(nil, gks...))
	r3, err := eval.RotateNew(ct, 3)
	if err != nil {
		t.Fatal(err)
	}
	r7, err := eval.RotateNew(r3, 4)
	if err != nil {
		t.Fatal(err)
	}
	out, _ := keys.Seal(r7, len(values))
	attestEvaluation(t, e, out, "rotate", []*client.Envelope{in}, 1, 2)
	got, prec, err := admin.DecryptFull(ctx, out)
	if err != nil {
		t.Fatal(err)
	}
	for i := range got {
		if want := values[(i+7)%len(values)]; math.Abs(got[i]-want) > math.Ldexp(1, -prec) {
			t.Fatalf("slot %d: %f, want %f within 2^-%d", i, got[i], want, prec)
		}
	}
	// A tampered extension is refused by the SDK.
	proxy := tamperProxy(t, e.url, func(path string, body []byte) []byte {
		if strings.HasSuffix(path, "/extension") {
			var se client.SignedExtension
			_ = json.Unmarshal(body, &se)
			se.Document = bytes.Replace(se.Document, []byte(`"sequence":2`), []byte(`"sequence":9`), 1)
			body, _ = json.Marshal(se)
		}
		return body
	})
	tf := &hekeys.Fetcher{BaseURL: proxy, Token: worker.Token, IdentityKey: e.idPub, CacheDir: t.TempDir(), HTTP: e.httpc}
	if _, err := tf.FetchLazy(ctx, "od", 1); err == nil || !strings.Contains(err.Error(), "not signed by the pinned identity key") {
		t.Fatalf("tampered extension: %v", err)
	}
	// ?form=full serves an on-demand seeded key expanded, with the full
	// digest the extension names.
	g := keys.Extension().GaloisKeys[0]
	st, h, _ := e.raw("HEAD", "/v1/blobs/sha256/"+strings.TrimPrefix(g.Digest, "sha256:")+"?form=full", worker.Token, "", "")
	if st != 200 || h.Get("ETag") != `"`+g.FullDigest+`"` || h.Get("Content-Length") != fmt.Sprint(g.FullSize) {
		t.Fatalf("?form=full of an on-demand key: %d %v", st, h)
	}
	// Every request is audited; the generating ones name the version.
	recs := auditOps(t, e, "POST /v1/keys/{name}/versions/{version}/evaluation-keys")
	if len(recs) != 3+9 {
		t.Fatalf("%d audit records of evaluation-key requests, want 12", len(recs))
	}
	if r := recs[0]; r.Status != 200 || r.Key != "od" || r.Version != 1 || r.Actor != worker.ID {
		t.Fatalf("the first request's record: %+v", r)
	}
}

// auditOps lists the audit records of an operation.
func auditOps(t *testing.T, e *env, op string) []*kms.AuditRecord {
	t.Helper()
	n, _ := e.store.Audit().AuditSize(ctx)
	recs, err := e.store.Audit().AuditRecords(ctx, 0, n)
	if err != nil {
		t.Fatal(err)
	}
	var out []*kms.AuditRecord
	for _, b := range recs {
		r, err := kms.DecodeAuditRecord(b)
		if err != nil {
			t.Fatal(err)
		}
		if r.Operation == op {
			out = append(out, r)
		}
	}
	return out
}

func mustToken(t *testing.T, e *env, role, keys string) string {
	t.Helper()
	tok, err := e.client(e.admin).CreateToken(ctx, client.CreateTokenRequest{Role: role, Keys: []string{keys}})
	if err != nil {
		t.Fatal(err)
	}
	return tok.Token
}

// TestGaloisKeysInTheBackground: a request whose new keys are past the
// async threshold answers 202; the operation ends with the keys listed.
func TestGaloisKeysInTheBackground(t *testing.T) {
	testAsyncKeysetBytes = 1 << 20 // one logN 13 Galois key is larger
	defer func() { testAsyncKeysetBytes = 0 }()
	e := newEnv(t)
	heKey(t, e, "bg", `{"name":"bg","kind":"ckks","policy":{"params":"ckks-logn13"}}`)
	wc := e.client(mustToken(t, e, "worker", "bg"))
	res, op, err := wc.GaloisKeys(ctx, "bg", 1, client.GaloisKeysRequest{Rotations: []int{1, 2}, Conjugation: true})
	if err != nil || res != nil || op == nil {
		t.Fatal(res, op, err)
	}
	done, err := wc.WaitOperation(ctx, op.ID, 20*time.Millisecond, nil)
	if err != nil || done.Progress.Done != 3 || done.Version != 1 {
		t.Fatalf("%+v %v", done, err)
	}
	f := &hekeys.Fetcher{BaseURL: e.url, Token: e.admin, IdentityKey: e.idPub, CacheDir: t.TempDir(), HTTP: e.httpc}
	keys, err := f.Fetch(ctx, "bg", 1)
	if err != nil {
		t.Fatal(err)
	}
	if n := len(keys.EvaluationKeys.GetGaloisKeysList()); n != 3 {
		t.Fatalf("Fetch loaded %d Galois keys, want the 3 of the extension", n)
	}
}

// TestRekey: a ciphertext of version 1 is re-keyed into version 2 with
// the switching key kmsd issues, attested as op rekey, and decrypted under
// version 2: within CKKS's precision, exactly for BGV. The policy's
// refusals change nothing.
func TestRekey(t *testing.T) {
	e := newEnv(t)
	admin := e.client(e.admin)
	for _, scheme := range []string{"ckks", "bgv"} {
		name := "rk-" + scheme
		heKey(t, e, name, fmt.Sprintf(`{"name":%q,"kind":%q,"policy":{"params":"%s-logn13","decrypt_budget":16}}`, name, scheme, scheme))
		f := &hekeys.Fetcher{BaseURL: e.url, Token: mustToken(t, e, "evaluator", name), IdentityKey: e.idPub, CacheDir: t.TempDir(), HTTP: e.httpc}
		v1, err := f.FetchPublic(ctx, name, 1)
		if err != nil {
			t.Fatal(err)
		}
		var in *client.Envelope
		var want []float64
		if scheme == "ckks" {
			want = make([]float64, 100)
			for i := range want {
				want[i] = float64(i)/50 - 1
			}
			in, err = v1.Encrypt(want)
		} else {
			vals := make([]uint64, v1.BGV.MaxSlots())
			for i := range vals {
				vals[i] = uint64(i*31) % v1.BGV.PlaintextModulus()
			}
			pt := bgv.NewPlaintext(v1.BGV, v1.BGV.MaxLevel())
			_ = bgv.NewEncoder(v1.BGV).Encode(vals, pt)
			ct, _ := rlwe.NewEncryptor(v1.BGV, v1.PublicKey).EncryptNew(pt)
			in, err = v1.Seal(ct, v1.BGV.MaxSlots()/2)
			for _, x := range vals[:v1.BGV.MaxSlots()/2] {
				want = append(want, float64(x))
			}
		}
		if err != nil {
			t.Fatal(err)
		}
		attestInput(t, e, in)
		// Not yet: there is no version 2.
		if _, err := f.SwitchingKey(ctx, v1, 2, true); err == nil {
			t.Fatal("a switching key to a version that does not exist")
		}
		if _, err := admin.Rotate(ctx, name); err != nil {
			t.Fatal(err)
		}
		m2, err := f.Manifest(ctx, name, 2)
		if err != nil {
			t.Fatal(err)
		}
		// Without a switching key, no re-keying is attested.
		fake := *in
		fake.Version, fake.Attestation = 2, nil
		if err := hekeys.AttestEvaluation(ctx, e.client(f.Token), &fake, "rekey", []*client.Envelope{in}, 1, 1); err == nil || !strings.Contains(err.Error(), "has no switching key to version 2") {
			t.Fatalf("rekey attested without a switching key: %v", err)
		}
		// Issuing one is an administrator's decision (it links the two
		// secrets): an evaluator may fetch and use it, not make it.
		if _, err := f.SwitchingKey(ctx, v1, 2, true); err == nil || !strings.Contains(err.Error(), "403") {
			t.Fatalf("an evaluator made a switching key: %v", err)
		}
		if _, err := admin.SwitchingKey(ctx, name, 1, 2); err != nil {
			t.Fatal(err)
		}
		swk, err := f.SwitchingKey(ctx, v1, 2, false)
		if err != nil {
			t.Fatal(err)
		}
		out, err := hekeys.Rekey(v1, m2, swk, in)
		if err != nil {
			t.Fatal(err)
		}
		if out.Version != 2 {
			t.Fatalf("re-keyed into version %d", out.Version)
		}
		// The op's rules: one input, amplification 1, one key switch.
		if err := hekeys.AttestEvaluation(ctx, e.client(f.Token), out, "rekey", []*client.Envelope{in}, 2, 1); err == nil || !strings.Contains(err.Error(), "amplification 1 and one key switch") {
			t.Fatalf("rekey with amplification 2: %v", err)
		}
		if err := hekeys.AttestEvaluation(ctx, e.client(f.Token), out, "rekey", []*client.Envelope{in}, 1, 1); err != nil {
			t.Fatal(err)
		}
		// Version 1 cannot decrypt the re-keyed ciphertext; version 2 can.
		got, prec, err := admin.DecryptFull(ctx, out)
		if err != nil {
			t.Fatal(err)
		}
		if len(got) != len(want) {
			t.Fatalf("%s: %d values, want %d", scheme, len(got), len(want))
		}
		t.Logf("%s: re-keyed, decrypted with %d bits of precision", scheme, prec)
		for i := range want {
			if scheme == "bgv" && got[i] != want[i] || scheme == "ckks" && math.Abs(got[i]-want[i]) > math.Ldexp(1, -prec) {
				t.Fatalf("%s slot %d: %v, want %v (precision %d bits)", scheme, i, got[i], want[i], prec)
			}
		}
		// The same switching key the second time; refusals.
		res, err := admin.SwitchingKey(ctx, name, 1, 2)
		if err != nil || res.Generated != 0 || res.SwitchingKey.ToVersion != 2 {
			t.Fatalf("again: %+v %v", res, err)
		}
		for _, c := range []struct {
			path, token, body string
			status            int
			says              string
		}{
			{"/v1/keys/" + name + "/versions/2/switching-keys", e.admin, `{"to_version":1}`, 400, "not after"},
			{"/v1/keys/" + name + "/versions/2/switching-keys", e.admin, `{"to_version":2}`, 400, "not after"},
			{"/v1/keys/" + name + "/versions/1/switching-keys", e.admin, `{"to_version":9}`, 404, ""},
			{"/v1/keys/" + name + "/versions/1/switching-keys", e.admin, `{}`, 400, "to_version is required"},
			{"/v1/keys/" + name + "/versions/primary/switching-keys", e.admin, `{"to_version":2}`, 400, "name the version"},
			{"/v1/keys/" + name + "/versions/1/switching-keys", mustToken(t, e, "decryptor", name), `{"to_version":2}`, 403, ""},
			{"/v1/keys/" + name + "/versions/1/switching-keys", f.Token, `{"to_version":2}`, 403, ""},
			{"/v1/keys/" + name + "/versions/1/switching-keys", mustToken(t, e, "worker", name), `{"to_version":2}`, 403, ""},
		} {
			st, _, b := e.raw("POST", c.path, c.token, "application/json", c.body)
			if st != c.status || !strings.Contains(string(b), c.says) {
				t.Errorf("%s %s: %d %s, want %d %q", c.path, c.body, st, b, c.status, c.says)
			}
		}
		// A disabled target; a source below min_decryption_version.
		for range 2 {
			if _, err := admin.Rotate(ctx, name); err != nil {
				t.Fatal(err)
			}
		}
		if _, err := admin.VersionAction(ctx, name, 3, "disable", 0); err != nil {
			t.Fatal(err)
		}
		if st, _, b := e.raw("POST", "/v1/keys/"+name+"/versions/1/switching-keys", e.admin, "application/json", `{"to_version":3}`); st != 409 || !strings.Contains(string(b), "not enabled") && !strings.Contains(string(b), "disabled") {
			t.Errorf("to a disabled version: %d %s", st, b)
		}
		if _, err := admin.UpdateKey(ctx, name, client.UpdateKeyRequest{MinDecryptionVersion: ptr(uint64(2))}); err != nil {
			t.Fatal(err)
		}
		if st, _, b := e.raw("POST", "/v1/keys/"+name+"/versions/1/switching-keys", e.admin, "application/json", `{"to_version":4}`); st != 409 && st != 404 || !strings.Contains(string(b), "min_decryption_version") {
			t.Errorf("from below min_decryption_version: %d %s", st, b)
		}
		// The re-keyed ciphertext's attestation names a version 1 input:
		// below min_decryption_version now, so no new rekey attestation.
		if err := hekeys.AttestEvaluation(ctx, e.client(f.Token), out, "rekey", []*client.Envelope{in}, 1, 1); err == nil {
			t.Error("a rekey from below min_decryption_version was attested")
		}
	}
}

func ptr[T any](v T) *T { return &v }

// TestRekeyAcrossParameters: versions of other parameters get no switching
// key.
func TestRekeyAcrossParameters(t *testing.T) {
	e := newEnv(t)
	admin := e.client(e.admin)
	heKey(t, e, "rp", `{"name":"rp","kind":"ckks","policy":{"params":"ckks-logn13"}}`)
	if st, _, b := e.raw("PATCH", "/v1/keys/rp", e.admin, "application/json", `{"policy":{"params":"ckks-logn14"}}`); st != 200 {
		t.Fatalf("%d %s", st, b)
	}
	if _, err := admin.Rotate(ctx, "rp"); err != nil {
		t.Fatal(err)
	}
	st, _, b := e.raw("POST", "/v1/keys/rp/versions/1/switching-keys", e.admin, "application/json", `{"to_version":2}`)
	if st != 400 || !strings.Contains(string(b), "different parameters") {
		t.Fatalf("%d %s", st, b)
	}
}

// rekeyed encrypts values under version 1 of key name, rotates it, and
// returns the attested input and its re-keying into version 2.
func rekeyed(t *testing.T, e *env, name string, values []float64) (in, out *client.Envelope) {
	t.Helper()
	f := &hekeys.Fetcher{BaseURL: e.url, Token: mustToken(t, e, "evaluator", name), IdentityKey: e.idPub, CacheDir: t.TempDir(), HTTP: e.httpc}
	v1, err := f.FetchPublic(ctx, name, 1)
	if err != nil {
		t.Fatal(err)
	}
	if in, err = v1.Encrypt(values); err != nil {
		t.Fatal(err)
	}
	attestInput(t, e, in)
	if _, err := e.client(e.admin).Rotate(ctx, name); err != nil {
		t.Fatal(err)
	}
	m2, err := f.Manifest(ctx, name, 2)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.client(e.admin).SwitchingKey(ctx, name, 1, 2); err != nil {
		t.Fatal(err)
	}
	swk, err := f.SwitchingKey(ctx, v1, 2, false)
	if err != nil {
		t.Fatal(err)
	}
	if out, err = hekeys.Rekey(v1, m2, swk, in); err != nil {
		t.Fatal(err)
	}
	if err := hekeys.AttestEvaluation(ctx, e.client(f.Token), out, "rekey", []*client.Envelope{in}, 1, 1); err != nil {
		t.Fatal(err)
	}
	return in, out
}

// TestRekeySpendsTheSourceBudget: a re-keyed ciphertext's noise depends
// on the old version's secret, so decrypting it spends the old version's
// budget too: once version 1's budget is spent, no ciphertext re-keyed
// from it is decrypted under version 2 (before, re-keying gave every
// secret a fresh budget per later version).
func TestRekeySpendsTheSourceBudget(t *testing.T) {
	e := newEnv(t)
	heKey(t, e, "sb", `{"name":"sb","kind":"ckks","policy":{"params":"ckks-logn13","decrypt_budget":2}}`)
	in, out := rekeyed(t, e, "sb", []float64{1, 2, 3})
	st, err := hekeys.VerifyAttestation(e.idPub, out)
	if err != nil || !slices.Equal(st.Sources, []uint64{1}) {
		t.Fatalf("the re-keyed statement's sources: %+v %v", st, err)
	}
	admin := e.client(e.admin)
	for range 2 {
		if _, err := admin.Decrypt(ctx, in); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := admin.Decrypt(ctx, in); err == nil {
		t.Fatal("version 1 decrypted past its budget")
	}
	_, err = admin.Decrypt(ctx, out)
	if err == nil || !strings.Contains(err.Error(), "re-keyed from version 1") || !strings.Contains(err.Error(), "budget") {
		t.Fatalf("a ciphertext re-keyed from a spent version: %v", err)
	}
	// Version 2's own ciphertexts still decrypt: the refusal spent nothing.
	f := &hekeys.Fetcher{BaseURL: e.url, Token: e.admin, IdentityKey: e.idPub, CacheDir: t.TempDir(), HTTP: e.httpc}
	v2, _ := f.FetchPublic(ctx, "sb", 2)
	own, _ := v2.Encrypt([]float64{4})
	attestInput(t, e, own)
	for range 2 {
		if _, err := admin.Decrypt(ctx, own); err != nil {
			t.Fatal(err)
		}
	}
}

// TestRekeyedRetiredWithItsSource: raising min_decryption_version past the
// version a ciphertext was re-keyed from retires the re-keyed ciphertext
// too, as README says.
func TestRekeyedRetiredWithItsSource(t *testing.T) {
	e := newEnv(t)
	heKey(t, e, "rt", `{"name":"rt","kind":"ckks","policy":{"params":"ckks-logn13","decrypt_budget":16}}`)
	_, out := rekeyed(t, e, "rt", []float64{1, 2, 3})
	admin := e.client(e.admin)
	if _, err := admin.Decrypt(ctx, out); err != nil {
		t.Fatal(err)
	}
	if _, err := admin.UpdateKey(ctx, "rt", client.UpdateKeyRequest{MinDecryptionVersion: ptr(uint64(2))}); err != nil {
		t.Fatal(err)
	}
	_, err := admin.Decrypt(ctx, out)
	if err == nil || !strings.Contains(err.Error(), "re-keyed from version 1") || !strings.Contains(err.Error(), "min_decryption_version") {
		t.Fatalf("a ciphertext re-keyed from a retired version: %v", err)
	}
}

// TestGaloisKeyJobsBounded: background requests for Galois keys past
// kms.MaxExtendJobs are refused (429) before they hold anything.
func TestGaloisKeyJobsBounded(t *testing.T) {
	testAsyncKeysetBytes = 1 << 20
	defer func() { testAsyncKeysetBytes = 0 }()
	e := newEnv(t)
	// logN 14: a job's 12 keys take longer than the requests after it.
	_, cop, err := e.client(e.admin).CreateKeyOrOperation(ctx, client.CreateKeyRequest{Name: "jb", Kind: "ckks", Policy: &client.Policy{Params: json.RawMessage(`"ckks-logn14"`), OnDemandGaloisKeys: 1024}})
	if err != nil {
		t.Fatal(err)
	}
	if cop != nil {
		if _, err := e.client(e.admin).WaitOperation(ctx, cop.ID, 20*time.Millisecond, nil); err != nil {
			t.Fatal(err)
		}
	}
	wc := e.client(mustToken(t, e, "worker", "jb"))
	var ops []*client.Operation
	refused := 0
	for i := range kms.MaxExtendJobs + 3 {
		// Each asks for its own 12 rotations.
		rots := make([]int, 12)
		for j := range rots {
			rots[j] = 12*i + j + 1
		}
		_, op, err := wc.GaloisKeys(ctx, "jb", 1, client.GaloisKeysRequest{Rotations: rots})
		switch {
		case err != nil && strings.Contains(err.Error(), "429"):
			refused++
		case err != nil:
			t.Fatal(err)
		default:
			ops = append(ops, op)
		}
	}
	if refused == 0 || len(ops) > kms.MaxExtendJobs {
		t.Fatalf("%d operations started, %d refused; at most %d may run", len(ops), refused, kms.MaxExtendJobs)
	}
	for _, op := range ops {
		if _, err := wc.WaitOperation(ctx, op.ID, 20*time.Millisecond, nil); err != nil {
			t.Fatal(err)
		}
	}
	// Once they are done, a new one starts.
	if _, op, err := wc.GaloisKeys(ctx, "jb", 1, client.GaloisKeysRequest{Rotations: []int{100, 101}}); err != nil || op == nil {
		t.Fatal(op, err)
	}
}
