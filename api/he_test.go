package api_test

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"

	"github.com/cloudflare/circl/sign/mldsa/mldsa65"

	"github.com/kmsd-project/kmsd/api/client"
	"github.com/kmsd-project/kmsd/api/client/hekeys"
	"github.com/kmsd-project/kmsd/kms"
)

// attestInput has an encryptor token (made here, for every key) vouch for
// env as an input, as kmsctl he encrypt does.
func attestInput(t *testing.T, e *env, env *client.Envelope) {
	t.Helper()
	tok, err := e.client(e.admin).CreateToken(ctx, client.CreateTokenRequest{Role: "encryptor", Keys: []string{"*"}})
	if err != nil {
		t.Fatal(err)
	}
	if err := hekeys.AttestInput(ctx, e.client(tok.Token), env); err != nil {
		t.Fatal(err)
	}
}

// attestEvaluation has an evaluator token vouch for env as op on inputs.
func attestEvaluation(t *testing.T, e *env, env *client.Envelope, op string, inputs []*client.Envelope, amplification float64, keySwitches int) {
	t.Helper()
	tok, err := e.client(e.admin).CreateToken(ctx, client.CreateTokenRequest{Role: "evaluator", Keys: []string{"*"}})
	if err != nil {
		t.Fatal(err)
	}
	if err := hekeys.AttestEvaluation(ctx, e.client(tok.Token), env, op, inputs, amplification, keySwitches); err != nil {
		t.Fatal(err)
	}
}

func heKey(t *testing.T, e *env, name, body string) {
	t.Helper()
	st, _, b := e.raw("POST", "/v1/keys", e.admin, "application/json", body)
	if st != 201 {
		t.Fatalf("create %s: %d %s", name, st, b)
	}
}

// TestHEManifestAndBlobs: a CKKS key's manifest is signed by the identity
// key, every blob it lists is served with its digest, Range and
// If-None-Match work, and a token sees only blobs of keys it may read.
func TestHEManifestAndBlobs(t *testing.T) {
	e := newEnv(t)
	heKey(t, e, "he1", `{"name":"he1","kind":"ckks","policy":{"params":"ckks-logn13","rotations":[1,2,4],"relinearization":true}}`)
	st, _, man := e.raw("GET", "/v1/keys/he1/versions/primary/evaluation-keys", e.admin, "", "")
	if st != 200 {
		t.Fatalf("manifest: %d %s", st, man)
	}
	var m kms.Manifest
	if err := json.Unmarshal(man, &m); err != nil || m.Key != "he1" || m.Version != 1 || m.Kind != "ckks" || len(m.GaloisKeys) != 3 || m.RelinearizationKey == nil || !strings.HasPrefix(m.ParamsID, "sha256:") {
		t.Fatalf("manifest %s: %v", man, err)
	}
	st, _, sigb := e.raw("GET", "/v1/keys/he1/versions/1/evaluation-keys/signature", e.admin, "", "")
	var sig client.ManifestSignature
	if st != 200 || json.Unmarshal(sigb, &sig) != nil || sig.Context != "kms-manifest-v1" || sig.IdentityVersion != 1 {
		t.Fatalf("signature: %d %s", st, sigb)
	}
	var pk mldsa65.PublicKey
	pk.UnmarshalBinary(e.idPub)
	if !mldsa65.Verify(&pk, man, []byte("kms-manifest-v1"), sig.Signature) {
		t.Fatal("the manifest signature does not verify with the identity key")
	}
	if mldsa65.Verify(&pk, append(man, ' '), []byte("kms-manifest-v1"), sig.Signature) {
		t.Fatal("the signature verifies over other bytes")
	}
	// The manifest is served byte-identical.
	if _, _, again := e.raw("GET", "/v1/keys/he1/versions/1/evaluation-keys", e.admin, "", ""); string(again) != string(man) {
		t.Fatal("the manifest changed between requests")
	}
	// Every blob: digest and size match.
	refs := []kms.BlobRef{m.PublicKey, *m.RelinearizationKey}
	for _, g := range m.GaloisKeys {
		refs = append(refs, kms.BlobRef{Digest: g.Digest, Size: g.Size})
	}
	for _, ref := range refs {
		url := "/v1/blobs/sha256/" + strings.TrimPrefix(ref.Digest, "sha256:") + "?form=seeded"
		st, h, body := e.raw("GET", url, e.admin, "", "")
		sum := sha256.Sum256(body)
		if st != 200 || int64(len(body)) != ref.Size || "sha256:"+hex.EncodeToString(sum[:]) != ref.Digest {
			t.Fatalf("blob %s: %d, %d bytes", ref.Digest, st, len(body))
		}
		if h.Get("ETag") != `"`+ref.Digest+`"` || h.Get("Content-Type") != "application/octet-stream" {
			t.Fatalf("blob headers: %v", h)
		}
	}
	// Range and If-None-Match.
	url := e.url + "/v1/blobs/sha256/" + strings.TrimPrefix(m.PublicKey.Digest, "sha256:") + "?form=seeded"
	req, _ := http.NewRequest("GET", url, nil)
	req.Header.Set("Authorization", "Bearer "+e.admin)
	req.Header.Set("Range", "bytes=100-199")
	resp, err := e.httpc.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	part := make([]byte, 200)
	n, _ := resp.Body.Read(part)
	resp.Body.Close()
	_, _, full := e.raw("GET", "/v1/blobs/sha256/"+strings.TrimPrefix(m.PublicKey.Digest, "sha256:")+"?form=seeded", e.admin, "", "")
	if resp.StatusCode != 206 || n != 100 || string(part[:n]) != string(full[100:200]) {
		t.Fatalf("range: %d, %d bytes", resp.StatusCode, n)
	}
	// A range past the end is a problem document (was text/plain); the
	// spec checker fails any 4xx that is not application/problem+json.
	req, _ = http.NewRequest("GET", url, nil)
	req.Header.Set("Authorization", "Bearer "+e.admin)
	req.Header.Set("Range", fmt.Sprintf("bytes=%d-", len(full)+10))
	resp, err = e.httpc.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	rb, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 416 || problemType(t, rb) != "range-not-satisfiable" || resp.Header.Get("Content-Range") != fmt.Sprintf("bytes */%d", len(full)) || resp.Header.Get("ETag") != "" {
		t.Fatalf("range past the end: %d %v %s", resp.StatusCode, resp.Header, rb)
	}
	req, _ = http.NewRequest("GET", url, nil)
	req.Header.Set("Authorization", "Bearer "+e.admin)
	req.Header.Set("If-None-Match", `"`+m.PublicKey.Digest+`"`)
	resp, err = e.httpc.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 304 {
		t.Fatalf("If-None-Match: %d", resp.StatusCode)
	}
	// The public-key endpoint names the public key as every Lattigo
	// client reads it: the full form, which kmsd expands from the seeded
	// blob.
	pub, err := e.client(e.admin).PublicKey(ctx, "he1", 0)
	if err != nil || pub.Digest != m.PublicKey.FullDigest || pub.Size != m.PublicKey.FullSize || pub.URL != "/v1/blobs/sha256/"+strings.TrimPrefix(m.PublicKey.Digest, "sha256:")+"?form=full" {
		t.Fatalf("public key: %+v %v", pub, err)
	}
	// A worker for other keys does not see these blobs; one for he* does.
	other, _ := e.client(e.admin).CreateToken(ctx, client.CreateTokenRequest{Role: "worker", Keys: []string{"team-b-*"}})
	mine, _ := e.client(e.admin).CreateToken(ctx, client.CreateTokenRequest{Role: "worker", Keys: []string{"he*"}})
	blobPath := "/v1/blobs/sha256/" + strings.TrimPrefix(m.PublicKey.Digest, "sha256:") + "?form=seeded"
	if st, _, _ := e.raw("GET", blobPath, other.Token, "", ""); st != 404 {
		t.Fatalf("a worker of other keys got the blob: %d", st)
	}
	if st, _, _ := e.raw("GET", blobPath, mine.Token, "", ""); st != 200 {
		t.Fatalf("the key's worker: %d", st)
	}
	if st, _, _ := e.raw("GET", "/v1/blobs/sha256/"+strings.Repeat("0", 64), e.admin, "", ""); st != 404 {
		t.Fatalf("unknown blob: %d", st)
	}
	if st, _, _ := e.raw("GET", "/v1/blobs/sha256/XYZ", e.admin, "", ""); st != 400 {
		t.Fatalf("malformed digest: %d", st)
	}
	// Rotation makes a new keyset with its own manifest.
	v2, err := e.client(e.admin).Rotate(ctx, "he1")
	if err != nil || v2.Version != 2 {
		t.Fatalf("rotate: %v", err)
	}
	_, _, man2 := e.raw("GET", "/v1/keys/he1/versions/2/evaluation-keys", e.admin, "", "")
	var m2 kms.Manifest
	json.Unmarshal(man2, &m2)
	if m2.Version != 2 || m2.PublicKey.Digest == m.PublicKey.Digest || m2.ParamsID != m.ParamsID {
		t.Fatalf("rotated manifest: %s", man2)
	}
}

// TestHERefusals: parameters above the security bound, unknown presets,
// bad rotations, a keyset above the size limit, and HE fields on other
// kinds are refused with their 4xx and create nothing.
func TestHERefusals(t *testing.T) {
	e := newEnv(t)
	big := make([]string, 30)
	for i := range big {
		big[i] = fmt.Sprint(i + 1)
	}
	cases := []struct {
		body   string
		status int
		typ    string
		text   string
	}{
		{`{"name":"h","kind":"ckks","policy":{"params":{"LogN":14,"LogQ":[60,60,60,60,60,60,60],"LogP":[61],"LogDefaultScale":40}}}`, 400, "invalid-request", "exceeds 438"},
		{`{"name":"h","kind":"ckks","policy":{"params":"ckks-logn99"}}`, 400, "invalid-request", "unknown ckks preset"},
		{`{"name":"h","kind":"ckks","policy":{}}`, 400, "invalid-request", "params is required"},
		{`{"name":"h","kind":"bgv","policy":{"params":"bgv-logn13","rotations":[0]}}`, 400, "invalid-request", "rotation 0"},
		{`{"name":"h","kind":"ckks","policy":{"params":"ckks-logn13","rotations":[5000]}}`, 400, "invalid-request", "outside"},
		{`{"name":"h","kind":"ckks","policy":{"params":"ckks-logn16","relinearization":true,"rotations":[` + strings.Join(big, ",") + `]}}`, 413, "too-large", "above the limit"},
		{`{"name":"h","kind":"ml-dsa-65","policy":{"params":"ckks-logn13"}}`, 400, "invalid-request", "HE kinds"},
		// The outside review's literals, whose secret key was recovered from
		// the public key: a sparse secret, a low-density secret, a tiny error.
		{`{"name":"weak","kind":"ckks","policy":{"params":{"LogN":13,"LogQ":[45,35],"LogP":[45],"LogDefaultScale":35,"Xs":{"Type":"Ternary","H":1}}}}`, 400, "invalid-request", "params.Xs.H"},
		{`{"name":"weak","kind":"ckks","policy":{"params":{"LogN":13,"LogQ":[45,35],"LogP":[45],"LogDefaultScale":35,"Xs":{"Type":"Ternary","P":0.001}}}}`, 400, "invalid-request", "params.Xs.P"},
		{`{"name":"weak","kind":"ckks","policy":{"params":{"LogN":13,"LogQ":[45,35],"LogP":[45],"LogDefaultScale":35,"Xe":{"Type":"DiscreteGaussian","Sigma":0.05,"Bound":1}}}}`, 400, "invalid-request", "params.Xe.Sigma"},
		{`{"name":"weak","kind":"bgv","policy":{"params":{"LogN":13,"LogQ":[54,54],"LogP":[55],"PlaintextModulus":65537,"Xs":{"Type":"Ternary","H":1}}}}`, 400, "invalid-request", "params.Xs.H"},
		{`{"name":"weak","kind":"ckks","policy":{"params":{"LogN":13,"LogQ":[45,35],"LogP":[45],"LogDefaultScale":35,"Unknown":1}}}`, 400, "invalid-request", "params.Unknown"},
		{`{"name":"h","kind":"ckks","policy":{"params":"ckks-logn13"}} `, 201, "", ""},
		{`{"name":"h2","kind":"ckks","policy":{"params":{"LogN":13,"LogQ":[45,35],"LogP":[45],"LogDefaultScale":35}}}`, 201, "", ""},
	}
	for _, c := range cases {
		before := e.snapshot()
		st, _, body := e.raw("POST", "/v1/keys", e.admin, "application/json", c.body)
		if st != c.status {
			t.Fatalf("%s: %d %s", c.body, st, body)
		}
		if c.status == 201 {
			continue
		}
		if problemType(t, body) != c.typ || !strings.Contains(string(body), c.text) {
			t.Fatalf("%s: %s", c.body, body)
		}
		if e.snapshot() != before {
			t.Fatalf("%s: a refused create changed state", c.body)
		}
	}
	// A PQ key has no evaluation keys.
	e.client(e.admin).CreateKey(ctx, client.CreateKeyRequest{Name: "pq", Kind: "ml-kem-768"})
	if st, _, body := e.raw("GET", "/v1/keys/pq/versions/1/evaluation-keys", e.admin, "", ""); st != 409 {
		t.Fatalf("manifest of a PQ key: %d %s", st, body)
	}
}
