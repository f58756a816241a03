package api_test

import (
	"bytes"
	"crypto/rand"
	"encoding/json"
	"errors"
	"io"
	"math"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/cloudflare/circl/sign/mldsa/mldsa65"
	"github.com/tuneinsight/lattigo/v6/core/rlwe"
	"github.com/tuneinsight/lattigo/v6/schemes/bgv"
	"github.com/tuneinsight/lattigo/v6/schemes/ckks"

	"github.com/kmsd-project/kmsd/api/client"
	"github.com/kmsd-project/kmsd/api/client/hekeys"
)

// countingTransport counts blob answers by status.
type countingTransport struct {
	next         http.RoundTripper
	full, notMod atomic.Int64
	blobRequests atomic.Int64
}

func (c *countingTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	resp, err := c.next.RoundTrip(r)
	if err == nil && strings.HasPrefix(r.URL.Path, "/v1/blobs/") {
		c.blobRequests.Add(1)
		switch resp.StatusCode {
		case 200:
			c.full.Add(1)
		case 304:
			c.notMod.Add(1)
		}
	}
	return resp, err
}

// TestWorkerCKKSEndToEnd: a worker built on hekeys fetches the keys,
// encrypts (an encryptor attests the input), multiplies, relinearizes and
// rotates (a worker attests the evaluation); kmsd's decrypt returns the
// expected values within the precision it reports after flooding. A second
// fetch costs only conditional requests.
func TestWorkerCKKSEndToEnd(t *testing.T) {
	e := newEnv(t)
	admin := e.client(e.admin)
	heKey(t, e, "he-ckks", `{"name":"he-ckks","kind":"ckks","policy":{"params":"ckks-logn13","rotations":[1,2,4],"relinearization":true,"decrypt_log_precision":20,"decrypt_budget":16}}`)
	worker, _ := admin.CreateToken(ctx, client.CreateTokenRequest{Role: "worker", Keys: []string{"he-*"}})
	decryptor, _ := admin.CreateToken(ctx, client.CreateTokenRequest{Role: "decryptor", Keys: []string{"he-*"}})
	ct := &countingTransport{next: e.checker}
	f := &hekeys.Fetcher{BaseURL: e.url, Token: worker.Token, IdentityKey: e.idPub, CacheDir: t.TempDir(), HTTP: &http.Client{Transport: ct}}
	keys, err := f.Fetch(ctx, "he-ckks", 0)
	if err != nil {
		t.Fatal(err)
	}
	if keys.Scheme != "ckks" || keys.Manifest.Version != 1 || len(keys.Manifest.GaloisKeys) != 3 {
		t.Fatalf("keys: %+v", keys.Manifest)
	}
	params := keys.CKKS
	enc := ckks.NewEncoder(params)
	values := make([]float64, params.MaxSlots())
	for i := range values {
		values[i] = float64(i%13)/4 - 1
	}
	pt := ckks.NewPlaintext(params, params.MaxLevel())
	enc.Encode(values, pt)
	c, err := rlwe.NewEncryptor(params, keys.PublicKey).EncryptNew(pt)
	if err != nil {
		t.Fatal(err)
	}
	in, err := keys.Seal(c, len(values))
	if err != nil {
		t.Fatal(err)
	}
	attestInput(t, e, in)
	eval := ckks.NewEvaluator(params, keys.EvaluationKeys)
	sq, err := eval.MulRelinNew(c, c)
	if err != nil {
		t.Fatal(err)
	}
	eval.Rescale(sq, sq)
	rot, err := eval.RotateNew(sq, 4)
	if err != nil {
		t.Fatal(err)
	}
	env, err := keys.Seal(rot, len(values))
	if err != nil {
		t.Fatal(err)
	}
	// x^2 of |x| <= 2: the noise grows by 2|x| <= 4; one rotation after
	// the rescale.
	attestEvaluation(t, e, env, "square-rotate", []*client.Envelope{in}, 4, 1)
	got, prec, err := e.client(decryptor.Token).DecryptFull(ctx, env)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != len(values) {
		t.Fatalf("%d values, want %d", len(got), len(values))
	}
	// Flooding leaves fewer than the 20 bits the policy asks for.
	if prec < 6 || prec >= 20 {
		t.Fatalf("precision %d bits", prec)
	}
	for i := range got {
		x := values[(i+4)%len(values)]
		if math.Abs(got[i]-x*x) > math.Ldexp(1, -prec) {
			t.Fatalf("slot %d: %f, want %f within 2^-%d", i, got[i], x*x, prec)
		}
	}
	// Rounded to the precision: every value is a multiple of 2^-prec.
	for _, v := range got[:16] {
		if scaled := math.Ldexp(v, prec); math.Abs(scaled-math.Round(scaled)) > 1e-6 {
			t.Fatalf("value %v is not rounded to %d bits", v, prec)
		}
	}
	// A second fetch: only conditional requests, all answered 304.
	full := ct.full.Load()
	if full != 5 {
		t.Fatalf("first fetch downloaded %d blobs, want 5", full)
	}
	if _, err := f.Fetch(ctx, "he-ckks", 1); err != nil {
		t.Fatal(err)
	}
	if ct.full.Load() != full || ct.notMod.Load() != 5 {
		t.Fatalf("second fetch: %d full downloads, %d not-modified", ct.full.Load()-full, ct.notMod.Load())
	}
	// The worker cannot decrypt; a decryptor of other keys cannot either.
	if _, err := e.client(worker.Token).Decrypt(ctx, env); client.StatusOf(err) != 403 {
		t.Fatalf("worker decrypts: %v", err)
	}
}

func TestWorkerBGVEndToEnd(t *testing.T) {
	e := newEnv(t)
	heKey(t, e, "he-bgv", `{"name":"he-bgv","kind":"bgv","policy":{"params":"bgv-logn13","rotations":[1],"relinearization":true}}`)
	f := &hekeys.Fetcher{BaseURL: e.url, Token: e.admin, IdentityKey: e.idPub, CacheDir: t.TempDir(), HTTP: e.httpc}
	keys, err := f.Fetch(ctx, "he-bgv", 1)
	if err != nil {
		t.Fatal(err)
	}
	params := keys.BGV
	half := params.MaxSlots() / 2
	enc := bgv.NewEncoder(params)
	values := make([]uint64, params.MaxSlots())
	for i := range values {
		values[i] = uint64(i*7) % 1000
	}
	pt := bgv.NewPlaintext(params, params.MaxLevel())
	enc.Encode(values, pt)
	c, _ := rlwe.NewEncryptor(params, keys.PublicKey).EncryptNew(pt)
	in, err := keys.Seal(c, half)
	if err != nil {
		t.Fatal(err)
	}
	attestInput(t, e, in)
	eval := bgv.NewEvaluator(params, keys.EvaluationKeys)
	sq, err := eval.MulRelinNew(c, c)
	if err != nil {
		t.Fatal(err)
	}
	rot, err := eval.RotateColumnsNew(sq, 1)
	if err != nil {
		t.Fatal(err)
	}
	env, err := keys.Seal(rot, half)
	if err != nil {
		t.Fatal(err)
	}
	// A product of two BGV phases multiplies the noise by about t*sqrt(N).
	attestEvaluation(t, e, env, "square-rotate", []*client.Envelope{in}, float64(params.PlaintextModulus())*math.Sqrt(float64(params.N())), 1)
	got, err := e.client(e.admin).Decrypt(ctx, env)
	if err != nil {
		t.Fatal(err)
	}
	tmod := params.PlaintextModulus()
	if len(got) != half {
		t.Fatalf("%d values, want the %d in use", len(got), half)
	}
	for i := 0; i < half; i++ {
		x := values[(i+1)%half]
		if uint64(got[i]) != x*x%tmod {
			t.Fatalf("slot %d: %v, want %d", i, got[i], x*x%tmod)
		}
	}
}

// tamperProxy forwards to kmsd and lets a test rewrite answers.
func tamperProxy(t *testing.T, target string, rewrite func(path string, body []byte) []byte) string {
	u, _ := url.Parse(target)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		req, _ := http.NewRequest(r.Method, u.String()+r.URL.RequestURI(), r.Body)
		req.Header = r.Header.Clone()
		resp, err := testTransport.RoundTrip(req)
		if err != nil {
			w.WriteHeader(502)
			return
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		b = rewrite(r.URL.Path, b)
		for k, v := range resp.Header {
			if k != "Content-Length" {
				w.Header()[k] = v
			}
		}
		w.WriteHeader(resp.StatusCode)
		w.Write(b)
	}))
	t.Cleanup(srv.Close)
	return srv.URL
}

// TestWorkerRefusesTampering: a flipped byte in a blob on disk, a forged
// manifest, a signature by another identity key, a manifest of another
// version: each makes the SDK fail with a verification error.
func TestWorkerRefusesTampering(t *testing.T) {
	e := newEnv(t)
	heKey(t, e, "he-t", `{"name":"he-t","kind":"ckks","policy":{"params":"ckks-logn13","rotations":[1],"relinearization":true}}`)
	e.client(e.admin).Rotate(ctx, "he-t")
	fetch := func(base string, identity []byte, version uint64) error {
		f := &hekeys.Fetcher{BaseURL: base, Token: e.admin, IdentityKey: identity, CacheDir: t.TempDir(), HTTP: &http.Client{Transport: testTransport}}
		_, err := f.Fetch(ctx, "he-t", version)
		return err
	}
	if err := fetch(e.url, e.idPub, 2); err != nil {
		t.Fatalf("clean fetch: %v", err)
	}
	otherPub, _, _ := mldsa65.GenerateKey(rand.Reader)
	otherBytes, _ := otherPub.MarshalBinary()
	cases := map[string]func() error{
		"another identity key": func() error { return fetch(e.url, otherBytes, 2) },
		"forged manifest": func() error {
			return fetch(tamperProxy(t, e.url, func(p string, b []byte) []byte {
				if strings.HasSuffix(p, "/evaluation-keys") {
					return bytes.Replace(b, []byte(`"version":2`), []byte(`"version":2 `), 1)
				}
				return b
			}), e.idPub, 2)
		},
		"manifest of another version": func() error {
			return fetch(tamperProxy(t, e.url, func(p string, b []byte) []byte {
				if strings.Contains(p, "/versions/2/evaluation-keys") {
					// Serve version 1's manifest and signature for version 2.
					_, _, other := e.raw("GET", strings.Replace(p, "/versions/2/", "/versions/1/", 1), e.admin, "", "")
					return other
				}
				return b
			}), e.idPub, 2)
		},
	}
	for name, call := range cases {
		if err := call(); !errors.Is(err, hekeys.ErrVerify) {
			t.Errorf("%s: %v, want a verification error", name, err)
		}
	}
	// A byte flipped in transit: the SDK checks every blob's digest.
	inTransit := fetch(tamperProxy(t, e.url, func(p string, b []byte) []byte {
		if strings.HasPrefix(p, "/v1/blobs/") && len(b) > 0 {
			b[len(b)/2] ^= 0x40
		}
		return b
	}), e.idPub, 2)
	if !errors.Is(inTransit, hekeys.ErrVerify) || !strings.Contains(inTransit.Error(), "digest") {
		t.Fatalf("a blob flipped in transit: %v", inTransit)
	}
	// A byte flipped in a blob file on the server's disk (after the clean
	// fetch above served, and so checked, every blob): kmsd checks the
	// stored bytes against the digest before it serves them, by GET, HEAD
	// or Range, refuses them as blob-corrupt, never as immutable, and lists
	// them in /readyz.
	ents, _ := os.ReadDir(e.blobsDir())
	var paths []string
	for _, ent := range ents {
		paths = append(paths, filepath.Join(e.blobsDir(), ent.Name()))
	}
	if len(paths) == 0 {
		t.Fatal("no blob files found")
	}
	flip := func(p string) {
		b, _ := os.ReadFile(p)
		b[len(b)/2] ^= 0x40
		os.WriteFile(p, b, 0o600)
	}
	for _, p := range paths {
		flip(p)
	}
	digest := "sha256:" + filepath.Base(paths[0])
	url := "/v1/blobs/sha256/" + filepath.Base(paths[0]) + "?form=seeded"
	for _, method := range []string{"GET", "HEAD"} {
		st, h, body := e.raw(method, url, e.admin, "", "")
		if st != 500 || strings.Contains(h.Get("Cache-Control"), "immutable") || (method == "GET" && !strings.Contains(string(body), "urn:kmsd:problem:blob-corrupt")) {
			t.Fatalf("%s of a flipped blob: %d %v %s", method, st, h, body)
		}
	}
	req, _ := http.NewRequest("GET", e.url+url, nil)
	req.Header.Set("Authorization", "Bearer "+e.admin)
	req.Header.Set("Range", "bytes=0-99")
	if resp, err := (&http.Client{Transport: testTransport}).Do(req); err != nil || resp.StatusCode != 500 {
		t.Fatalf("range of a flipped blob: %v %v", resp, err)
	} else {
		resp.Body.Close()
	}
	if err := fetch(e.url, e.idPub, 2); err == nil {
		t.Fatal("a fetch of flipped blobs succeeded")
	}
	var health client.Health
	_, _, body := e.raw("GET", "/readyz", "", "", "")
	if json.Unmarshal(body, &health); health.BlobsFailingDigest < 1 || strings.Contains(string(body), digest) {
		t.Fatalf("readyz does not count the flipped blob, or names it to anyone: %s", body)
	}
	failed := 0
	for _, line := range e.auditLog() {
		if strings.Contains(string(line), `"problem":"blob-corrupt"`) {
			failed++
		}
	}
	if failed < 3 {
		t.Fatalf("%d refusals of the flipped blob in the audit log", failed)
	}
	// Put back, the blobs serve again (their files changed: checked again).
	for _, p := range paths {
		flip(p)
	}
	if err := fetch(e.url, e.idPub, 2); err != nil {
		t.Fatalf("after the blobs were restored: %v", err)
	}
	if st, _, body := e.raw("GET", url, e.admin, "", ""); st != 200 {
		t.Fatalf("the restored blob: %d %s", st, body)
	}
	_, _, body = e.raw("GET", "/readyz", "", "", "")
	if health = (client.Health{}); json.Unmarshal(body, &health) != nil || health.BlobsFailingDigest != 0 {
		t.Fatalf("readyz after the restore: %s", body)
	}
}

// TestDecryptRefusals: a ciphertext of another parameter set, the wrong
// media type, a body above the limit, and decryptions past the budget.
func TestDecryptRefusals(t *testing.T) {
	e := newEnv(t)
	heKey(t, e, "he-d", `{"name":"he-d","kind":"ckks","policy":{"params":"ckks-logn13","decrypt_budget":2}}`)
	f := &hekeys.Fetcher{BaseURL: e.url, Token: e.admin, IdentityKey: e.idPub, CacheDir: t.TempDir(), HTTP: e.httpc}
	keys, err := f.Fetch(ctx, "he-d", 1)
	if err != nil {
		t.Fatal(err)
	}
	good, err := keys.Encrypt([]float64{1, 2, 3})
	if err != nil {
		t.Fatal(err)
	}
	attestInput(t, e, good)
	goodJSON, _ := json.Marshal(good)
	// A ciphertext of ckks-logn14.
	p14, _ := ckks.NewParametersFromLiteral(ckks.ParametersLiteral{LogN: 14, LogQ: []int{55, 40, 40}, LogP: []int{55}, LogDefaultScale: 40})
	kg := rlwe.NewKeyGenerator(p14)
	sk14 := kg.GenSecretKeyNew()
	pt14 := ckks.NewPlaintext(p14, p14.MaxLevel())
	ckks.NewEncoder(p14).Encode([]float64{1}, pt14)
	c14, _ := rlwe.NewEncryptor(p14, sk14).EncryptNew(pt14)
	foreign, _ := c14.MarshalBinary()
	// A same-size ciphertext under other moduli.
	p13b, _ := ckks.NewParametersFromLiteral(ckks.ParametersLiteral{LogN: 13, LogQ: []int{60, 55, 55}, LogP: []int{55}, LogDefaultScale: 50})
	skb := rlwe.NewKeyGenerator(p13b).GenSecretKeyNew()
	ptb := ckks.NewPlaintext(p13b, p13b.MaxLevel())
	ckks.NewEncoder(p13b).Encode([]float64{1}, ptb)
	cb, _ := rlwe.NewEncryptor(p13b, skb).EncryptNew(ptb)
	other, _ := cb.MarshalBinary()
	// A ciphertext of another key of the same preset, in its own envelope.
	heKey(t, e, "he-other", `{"name":"he-other","kind":"ckks","policy":{"params":"ckks-logn13"}}`)
	otherKeys, err := f.Fetch(ctx, "he-other", 1)
	if err != nil {
		t.Fatal(err)
	}
	otherEnv, _ := otherKeys.Encrypt([]float64{1, 2, 3})
	attestInput(t, e, otherEnv)
	otherJSON, _ := json.Marshal(otherEnv)
	// An honest input of he-d, attested, whose attestation is then put on
	// the chosen ciphertext (0, 1) of the same size.
	chosen := *good
	goodCT, err := keys.Open(good)
	if err != nil {
		t.Fatal(err)
	}
	zeroOne := goodCT.CopyNew()
	r := keys.CKKS.RingQ().AtLevel(zeroOne.Level())
	r.MulScalar(zeroOne.Value[0], 0, zeroOne.Value[0])
	r.MulScalar(zeroOne.Value[1], 0, zeroOne.Value[1])
	r.AddScalar(zeroOne.Value[1], 1, zeroOne.Value[1])
	chosen.Ciphertext, _ = zeroOne.MarshalBinary()
	forged := *good
	forged.Attestation = &client.Attestation{Payload: good.Attestation.Payload, Signature: append([]byte{good.Attestation.Signature[0] ^ 1}, good.Attestation.Signature[1:]...), SignedBy: good.Attestation.SignedBy}
	unattested := *good
	unattested.Attestation = nil
	with := func(change func(*client.Envelope)) string {
		c := *good
		change(&c)
		b, _ := json.Marshal(&c)
		return string(b)
	}
	path := "/v1/keys/he-d/versions/1/decrypt"
	for _, c := range []struct {
		name, ctype string
		body        string
		status      int
		want        string
	}{
		{"other parameters (larger)", "application/json", with(func(c *client.Envelope) { c.Ciphertext = foreign }), 413, "at most"},
		{"garbage ciphertext", "application/json", with(func(c *client.Envelope) { c.Ciphertext = []byte("not a ciphertext") }), 400, "not a degree-1 ciphertext"},
		{"truncated ciphertext", "application/json", with(func(c *client.Envelope) { c.Ciphertext = c.Ciphertext[:len(c.Ciphertext)/2] }), 400, "truncated"},
		{"same size, other moduli", "application/json", with(func(c *client.Envelope) { c.Ciphertext = other }), 400, "another parameter set"},
		{"another key's envelope", "application/json", string(otherJSON), 400, `under key "he-other" version 1, not "he-d" version 1`},
		{"another version", "application/json", with(func(c *client.Envelope) { c.Version = 2 }), 400, `version 2, not "he-d" version 1`},
		{"another parameter id", "application/json", with(func(c *client.Envelope) { c.ParamsID = "sha256:" + strings.Repeat("0", 64) }), 400, "made under parameters sha256:0000"},
		{"wrong level", "application/json", with(func(c *client.Envelope) { c.Level-- }), 400, "its ciphertext is at level"},
		{"wrong scale", "application/json", with(func(c *client.Envelope) { c.Scale *= 2 }), 400, "its ciphertext has"},
		{"more slots than it has", "application/json", with(func(c *client.Envelope) { c.Slots = 1 << 16 }), 400, "slots in use, its ciphertext has"},
		{"unknown field", "application/json", strings.Replace(string(goodJSON), `{`, `{"extra":1,`, 1), 400, "not a ciphertext envelope"},
		{"missing field", "application/json", strings.Replace(string(goodJSON), `"slots":3,`, ``, 1), 400, "needs key, version"},
		{"not JSON", "application/json", "{", 400, "not a ciphertext envelope"},
		{"raw bytes", "application/octet-stream", string(good.Ciphertext), 415, "ciphertext envelope"},
		{"no attestation", "application/json", with(func(c *client.Envelope) { *c = unattested }), 400, "has no attestation"},
		{"chosen ciphertext under an honest attestation", "application/json", with(func(c *client.Envelope) { *c = chosen }), 400, "does not cover this ciphertext"},
		{"attestation with a flipped signature byte", "application/json", with(func(c *client.Envelope) { *c = forged }), 400, "does not verify"},
		{"duplicate key field", "application/json", strings.Replace(string(goodJSON), `{`, `{"key":"he-d",`, 1), 400, "duplicate field"},
		{"a field in another case", "application/json", strings.Replace(string(goodJSON), `"key":`, `"Key":`, 1), 400, "unknown field"},
		{"trailing brace", "application/json", string(goodJSON) + "}", 400, "not a ciphertext envelope"},
		{"trailing bracket", "application/json", string(goodJSON) + "]", 400, "not a ciphertext envelope"},
		{"a field with a long s (U+017F)", "application/json", strings.Replace(string(goodJSON), `{`, `{"ſcale":1,`, 1), 400, "unknown field"},
		{"a Kelvin-sign key", "application/json", strings.Replace(string(goodJSON), `"key":`, `"\u212aey":`, 1), 400, "unknown field"},
		{"ciphertext not base64", "application/json", strings.Replace(string(goodJSON), `"ciphertext":"`, `"ciphertext":"***`, 1), 400, `field "ciphertext" is not valid standard base64`},
		{"ciphertext as an array of numbers", "application/json", strings.Replace(string(goodJSON), `"ciphertext":"`, `"ciphertext":[1,2],"x":"`, 1), 400, "must be a standard base64 string"},
	} {
		before := e.snapshot()
		st, _, body := e.raw("POST", path, e.admin, c.ctype, c.body)
		var prob client.Problem
		json.Unmarshal(body, &prob)
		if st != c.status || !strings.Contains(prob.Detail, c.want) {
			t.Errorf("%s: %d %s", c.name, st, body)
		}
		if e.snapshot() != before {
			t.Errorf("%s: a refused decryption changed the store", c.name)
		}
	}
	// Only the slots in use come back.
	if vals, err := e.client(e.admin).Decrypt(ctx, good); err != nil || len(vals) != 3 || math.Abs(vals[2]-3) > 1e-3 {
		t.Fatalf("decrypt: %v %v", vals, err)
	}
	// The budget: two decryptions (one above), then 429 asking for a rotation.
	for i := 1; i < 2; i++ {
		if _, err := e.client(e.admin).Decrypt(ctx, good); err != nil {
			t.Fatalf("decryption %d: %v", i+1, err)
		}
	}
	_, err = e.client(e.admin).Decrypt(ctx, good)
	if client.StatusOf(err) != 429 || !strings.Contains(err.Error(), "rotate") {
		t.Fatalf("past the budget: %v", err)
	}
	// The review's finding: a PATCH that left out decrypt_budget reset it
	// to unlimited and the exhausted version decrypted again. A merge patch
	// keeps what it does not name.
	admin := e.client(e.admin)
	k, err := admin.UpdateKey(ctx, "he-d", client.UpdateKeyRequest{Policy: &client.Policy{DestroyWaitDays: 7}})
	if err != nil || k.Policy.DecryptBudget != 2 || k.Policy.DestroyWaitDays != 7 || string(k.Policy.Params) != `"ckks-logn13"` {
		t.Fatalf("patch of destroy_wait_days: %+v %v", k, err)
	}
	if st, _, body := e.raw("PATCH", "/v1/keys/he-d", e.admin, "application/json", `{"policy":{"rotations":[1]}}`); st != 200 || !strings.Contains(string(body), `"decrypt_budget":2`) {
		t.Fatalf("raw patch: %d %s", st, body)
	}
	if _, err := admin.Decrypt(ctx, good); client.StatusOf(err) != 429 {
		t.Fatalf("after an unrelated patch the exhausted version decrypts: %v", err)
	}
	// The budget can be lowered, not raised: the decryptions answered were
	// flooded for it. Clearing it (the default, 4096) is a raise too.
	before := e.snapshot()
	if _, err := admin.UpdateKey(ctx, "he-d", client.UpdateKeyRequest{Policy: &client.Policy{DecryptBudget: 3}}); client.StatusOf(err) != 400 || !strings.Contains(err.Error(), "lowered, not raised") {
		t.Fatalf("raise the budget: %v", err)
	}
	if _, err := admin.UpdateKey(ctx, "he-d", client.UpdateKeyRequest{ClearPolicy: []string{"decrypt_budget"}}); client.StatusOf(err) != 400 {
		t.Fatalf("clear the budget: %v", err)
	}
	if e.snapshot() != before {
		t.Fatal("a refused budget change changed the store")
	}
	if k, err = admin.UpdateKey(ctx, "he-d", client.UpdateKeyRequest{Policy: &client.Policy{DecryptBudget: 1}}); err != nil || k.Policy.DecryptBudget != 1 || k.Policy.DestroyWaitDays != 7 {
		t.Fatalf("lower the budget: %+v %v", k, err)
	}
	if _, err := admin.Decrypt(ctx, good); client.StatusOf(err) != 429 {
		t.Fatalf("past the lowered budget: %v", err)
	}
	for _, bad := range []string{`{"policy":[1]}`, `{"policy":"x"}`, `{"policy":{"bogus":1}}`, `{"policy":{"destroy_wait_days":0}}`} {
		before := e.snapshot()
		if st, _, body := e.raw("PATCH", "/v1/keys/he-d", e.admin, "application/json", bad); st != 400 {
			t.Errorf("patch %s: %d %s", bad, st, body)
		}
		if e.snapshot() != before {
			t.Errorf("patch %s changed state", bad)
		}
	}
}

// TestWorkerResumesDownload: a partial blob left in the cache by an
// interrupted download is completed with a Range request, and a corrupt
// partial file is detected, not used.
func TestWorkerResumesDownload(t *testing.T) {
	e := newEnv(t)
	heKey(t, e, "he-r", `{"name":"he-r","kind":"ckks","policy":{"params":"ckks-logn13"}}`)
	pub, err := e.client(e.admin).PublicKey(ctx, "he-r", 1)
	if err != nil {
		t.Fatal(err)
	}
	// The stored (seeded) blob the public-key URL names.
	h := strings.TrimPrefix(strings.TrimSuffix(pub.URL, "?form=full"), "/v1/blobs/sha256/")
	_, _, full := e.raw("GET", "/v1/blobs/sha256/"+h+"?form=seeded", e.admin, "", "")
	var ranges atomic.Int64
	tr := roundTripFunc(func(r *http.Request) (*http.Response, error) {
		if r.Header.Get("Range") != "" {
			ranges.Add(1)
		}
		return testTransport.RoundTrip(r)
	})
	for _, c := range []struct {
		name    string
		part    []byte
		wantErr bool
	}{
		{"good half", full[:len(full)/2], false},
		{"corrupt half", append([]byte{full[0] ^ 1}, full[1:len(full)/2]...), true},
	} {
		cache := t.TempDir()
		os.WriteFile(filepath.Join(cache, h+".part"), c.part, 0o600)
		f := &hekeys.Fetcher{BaseURL: e.url, Token: e.admin, IdentityKey: e.idPub, CacheDir: cache, HTTP: &http.Client{Transport: tr}}
		before := ranges.Load()
		_, err := f.Fetch(ctx, "he-r", 1)
		if ranges.Load() != before+1 {
			t.Fatalf("%s: %d range requests, want 1", c.name, ranges.Load()-before)
		}
		if c.wantErr != (err != nil) || (err != nil && !errors.Is(err, hekeys.ErrVerify)) {
			t.Fatalf("%s: %v", c.name, err)
		}
		if !c.wantErr {
			got, _ := os.ReadFile(filepath.Join(cache, h))
			if !bytes.Equal(got, full) {
				t.Fatalf("%s: the cached blob differs", c.name)
			}
		}
	}
}

type roundTripFunc func(*http.Request) (*http.Response, error)

func (f roundTripFunc) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }

// TestConcurrentFetchesShareTheCache: eight fetches of one key version at
// once into one cache dir (kmsd-mcp's tool calls loading a version) all
// get the keys. They shared one partial file per blob, and an outside
// review saw 7 of 8 fail, with local paths in the errors agents saw.
func TestConcurrentFetchesShareTheCache(t *testing.T) {
	e := newEnv(t)
	heKey(t, e, "he-c", `{"name":"he-c","kind":"ckks","policy":{"params":"ckks-logn13","rotations":[1,2],"relinearization":true}}`)
	dir := t.TempDir()
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for range 8 {
		wg.Go(func() {
			f := &hekeys.Fetcher{BaseURL: e.url, Token: e.admin, IdentityKey: e.idPub, CacheDir: dir, HTTP: e.httpc}
			if _, err := f.Fetch(ctx, "he-c", 1); err != nil {
				errs <- err
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	parts, _ := filepath.Glob(filepath.Join(dir, "*.part"))
	if len(parts) != 0 {
		t.Errorf("partial files left: %v", parts)
	}
}
