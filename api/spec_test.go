package api_test

import (
	"bytes"
	"encoding/json"
	"fmt"
	"math"
	"net/http"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"testing"

	"github.com/getkin/kin-openapi/openapi3"

	"github.com/kmsd-project/kmsd/api/client"
	"github.com/kmsd-project/kmsd/api/client/hekeys"
)

// TestSpecDeclaresSharedAnswers: every operation has a unique operationId
// and declares what any request can get: 429, 500 and 503 everywhere; 401
// and 403 where a token is needed; 400, 413 and 415 where there is a body;
// 400 where there are query parameters; 400 and 404 where the path names
// something.
func TestSpecDeclaresSharedAnswers(t *testing.T) {
	ids := map[string]string{}
	for path, item := range spec.Paths.Map() {
		for method, op := range item.Operations() {
			where := method + " " + path
			if op.OperationID == "" {
				t.Errorf("%s: no operationId", where)
			} else if other, dup := ids[op.OperationID]; dup {
				t.Errorf("%s and %s share operationId %s", where, other, op.OperationID)
			}
			ids[op.OperationID] = where
			need := []string{"429", "500", "503"}
			if op.Security == nil || len(*op.Security) > 0 {
				need = append(need, "401", "403")
			}
			if op.RequestBody != nil {
				need = append(need, "400", "413", "415")
			}
			params := append(openapi3.Parameters{}, item.Parameters...)
			params = append(params, op.Parameters...)
			for _, p := range params {
				switch p.Value.In {
				case "query":
					need = append(need, "400")
				case "path":
					need = append(need, "400", "404")
				}
			}
			for _, s := range need {
				if op.Responses.Value(s) == nil {
					t.Errorf("%s does not declare %s", where, s)
				}
			}
		}
	}
}

// TestEveryRefusalIsDeclared sends every operation in openapi.yaml the
// requests that are refused before or inside its handler (no token, an
// auditor's token, a worker's token for other keys, an unknown key, a body
// that is not JSON, a bad query) through the spec checker, which fails the
// test on any status the operation does not declare.
func TestEveryRefusalIsDeclared(t *testing.T) {
	e := newEnv(t)
	admin := e.client(e.admin)
	if _, err := admin.CreateKey(ctx, client.CreateKeyRequest{Name: "k", Kind: "ml-dsa-44"}); err != nil {
		t.Fatal(err)
	}
	auditor, err := admin.CreateToken(ctx, client.CreateTokenRequest{Role: "auditor", Keys: []string{"*"}})
	if err != nil {
		t.Fatal(err)
	}
	worker, err := admin.CreateToken(ctx, client.CreateTokenRequest{Role: "worker", Keys: []string{"other-*"}})
	if err != nil {
		t.Fatal(err)
	}
	param := regexp.MustCompile(`\{[a-z]+\}`)
	fill := func(path, name string) string {
		return param.ReplaceAllStringFunc(path, func(p string) string {
			switch p {
			case "{name}":
				return name
			case "{version}":
				return "1"
			case "{id}":
				return "0123456789abcdef"
			case "{hex}":
				return strings.Repeat("0", 64)
			case "{path}":
				return "checkpoint"
			case "{op}":
				return "ping"
			}
			t.Fatalf("no value for %s", p)
			return ""
		})
	}
	var ops []string
	for path, item := range spec.Paths.Map() {
		for method := range item.Operations() {
			ops = append(ops, method+" "+path)
		}
	}
	sort.Strings(ops)
	seen := map[int]bool{}
	for _, o := range ops {
		method, path, _ := strings.Cut(o, " ")
		for _, c := range []struct {
			token, name, ctype, body, query string
		}{
			{"", "k", "", "", ""},
			{auditor.Token, "k", "application/json", "{}", ""},
			{worker.Token, "k", "application/json", "{}", ""},
			{e.admin, "nope", "application/json", "{}", ""},
			{e.admin, "k", "text/plain", "x", ""},
			{e.admin, "k", "application/json", "{", ""},
			{e.admin, "k", "application/json", "{}", "?limit=0&start=x&index=x&page_token=%00"},
		} {
			if method == http.MethodGet || method == http.MethodDelete {
				c.ctype, c.body = "", ""
			}
			status, _, _ := e.raw(method, fill(path, c.name)+c.query, c.token, c.ctype, c.body)
			seen[status] = true
		}
	}
	for _, s := range []int{400, 401, 403, 404, 415} {
		if !seen[s] {
			t.Errorf("no operation answered %d: the probe is not reaching the handlers", s)
		}
	}
	var got []int
	for s := range seen {
		got = append(got, s)
	}
	slices.Sort(got)
	t.Logf("statuses seen: %v", got)
}

// TestPageTokensAreOpaqueAndChecked: a page token continues only the list
// (and key) it came from; a key name, a made-up or changed token, or a
// token of another list is refused with 400.
func TestPageTokensAreOpaqueAndChecked(t *testing.T) {
	e := newEnv(t)
	c := e.client(e.admin)
	for _, n := range []string{"a", "b", "c"} {
		if _, err := c.CreateKey(ctx, client.CreateKeyRequest{Name: n, Kind: "ml-dsa-44"}); err != nil {
			t.Fatal(err)
		}
		c.Rotate(ctx, n)
		c.Rotate(ctx, n)
	}
	c.CreateToken(ctx, client.CreateTokenRequest{Role: "worker", Keys: []string{"a"}})
	keys, err := c.ListKeys(ctx, 1, "")
	if err != nil || keys.NextPageToken == "" || keys.NextPageToken == "a" {
		t.Fatalf("first page: %+v %v", keys, err)
	}
	if page, err := c.ListKeys(ctx, 1, keys.NextPageToken); err != nil || page.Keys[0].Name != "b" {
		t.Fatalf("second page: %+v %v", page, err)
	}
	toks, _ := c.ListTokens(ctx, 1, "")
	vers, _ := c.ListVersions(ctx, "a", 1, "")
	if toks.NextPageToken == "" || vers.NextPageToken == "" {
		t.Fatal("no next page")
	}
	if page, err := c.ListVersions(ctx, "a", 1, vers.NextPageToken); err != nil || page.Versions[0].Version != 2 {
		t.Fatalf("versions page 2: %+v %v", page, err)
	}
	changed := []byte(keys.NextPageToken)
	changed[len(changed)/2] ^= 1
	for _, q := range []string{
		"/v1/keys?page_token=garbage",
		"/v1/keys?page_token=a",
		"/v1/keys?page_token=" + string(changed),
		"/v1/keys?page_token=" + toks.NextPageToken,
		"/v1/tokens?page_token=" + keys.NextPageToken,
		"/v1/keys/b/versions?page_token=" + vers.NextPageToken,
		"/v1/keys/a/versions?page_token=2",
		"/v1/keys/a/versions?page_token=" + strings.Repeat("A", 600),
	} {
		status, _, body := e.raw("GET", q, e.admin, "", "")
		if status != 400 || !strings.Contains(string(body), "malformed page_token") {
			t.Errorf("GET %s: %d %s", q, status, body)
		}
	}
}

// TestHEADAndAllow: HEAD answers as GET without a body on public keys and
// blobs; a 405 names the methods the endpoint allows.
func TestHEADAndAllow(t *testing.T) {
	e := newEnv(t)
	c := e.client(e.admin)
	if _, err := c.CreateKey(ctx, client.CreateKeyRequest{Name: "k", Kind: "ml-kem-768"}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.CreateKey(ctx, client.CreateKeyRequest{Name: "he", Kind: "ckks", Policy: &client.Policy{Params: []byte(`"ckks-logn13"`)}}); err != nil {
		t.Fatal(err)
	}
	pk, err := c.PublicKey(ctx, "he", 1)
	if err != nil {
		t.Fatal(err)
	}
	blob := pk.URL
	for _, path := range []string{"/v1/keys/k/versions/1/public-key", blob} {
		gs, gh, gb := e.raw("GET", path, e.admin, "", "")
		hs, hh, hb := e.raw("HEAD", path, e.admin, "", "")
		if gs != 200 || hs != 200 || len(hb) != 0 || len(gb) == 0 {
			t.Fatalf("%s: GET %d (%d bytes), HEAD %d (%d bytes)", path, gs, len(gb), hs, len(hb))
		}
		if hh.Get("Content-Type") != gh.Get("Content-Type") || hh.Get("ETag") != gh.Get("ETag") {
			t.Errorf("%s: HEAD headers %v differ from GET's %v", path, hh, gh)
		}
		if cl := hh.Get("Content-Length"); cl != "" && cl != fmt.Sprint(len(gb)) {
			t.Errorf("%s: HEAD Content-Length %s, GET body %d bytes", path, cl, len(gb))
		}
		if s, _, _ := e.raw("HEAD", path, "", "", ""); s != 401 {
			t.Errorf("%s: HEAD without a token: %d", path, s)
		}
	}
	for _, c := range []struct{ method, path, allow string }{
		{"DELETE", "/v1/keys", "GET, POST"},
		{"PUT", "/v1/keys/k", "GET, PATCH"},
		{"POST", "/v1/keys/k/versions/1/public-key", "GET, HEAD"},
		{"GET", "/v1/keys/k/sign", "POST"},
	} {
		status, h, body := e.raw(c.method, c.path, e.admin, "application/json", "")
		if status != 405 || h.Get("Allow") != c.allow || problemType(t, body) != "method-not-allowed" {
			t.Errorf("%s %s: %d Allow %q %s, want 405 Allow %q", c.method, c.path, status, h.Get("Allow"), body, c.allow)
		}
	}
}

// TestNoNumberAbove2To53: public documents carry 64-bit integers as text,
// so a client whose JSON numbers are doubles (JavaScript, Prism) reads the
// moduli exact and the manifest signature still verifies over the bytes
// served. Moduli here are 55-bit.
func TestNoNumberAbove2To53(t *testing.T) {
	e := newEnv(t)
	c := e.client(e.admin)
	lit := `{"LogN":13,"LogQ":[55,40,40],"LogP":[55],"LogDefaultScale":40}`
	if _, err := c.CreateKey(ctx, client.CreateKeyRequest{Name: "he", Kind: "ckks", Policy: &client.Policy{Params: []byte(lit)}}); err != nil {
		t.Fatal(err)
	}
	_, _, manifest := e.raw("GET", "/v1/keys/he/versions/1/evaluation-keys", e.admin, "", "")
	// A second key from the manifest's literal (explicit 55-bit Q and P),
	// given back as the string it came in: its answers carry it the same way.
	var m struct{ Params json.RawMessage }
	json.Unmarshal(manifest, &m)
	if _, err := c.CreateKey(ctx, client.CreateKeyRequest{Name: "he2", Kind: "ckks", Policy: &client.Policy{Params: m.Params}}); err != nil {
		t.Fatalf("create with the literal a manifest carried: %v", err)
	}
	_, _, keyDoc := e.raw("GET", "/v1/keys/he2", e.admin, "", "")
	big := 0
	for _, doc := range [][]byte{keyDoc, manifest} {
		dec := json.NewDecoder(bytes.NewReader(doc))
		dec.UseNumber()
		for {
			tok, err := dec.Token()
			if err != nil {
				break
			}
			if n, ok := tok.(json.Number); ok {
				if f, _ := strconv.ParseFloat(n.String(), 64); math.Abs(f) >= 1<<53 {
					t.Errorf("a number above 2^53 in a public document: %s in %s", n, doc)
				}
			}
			if s, ok := tok.(string); ok && strings.HasPrefix(s, "{") {
				// The literal's text holds the moduli exact.
				var l struct{ Q, P []uint64 }
				if err := json.Unmarshal([]byte(s), &l); err != nil {
					t.Fatal(err)
				}
				for _, q := range append(l.Q, l.P...) {
					if q >= 1<<53 {
						big++
					}
				}
			}
		}
	}
	if big != 4 {
		t.Fatalf("found %d moduli above 2^53 in the literal texts, want the two 55-bit ones in each document", big)
	}
	// The SDK verifies the signature over the bytes served and reads the
	// literal from its text.
	f := &hekeys.Fetcher{BaseURL: e.url, Token: e.admin, IdentityKey: e.idPub, CacheDir: t.TempDir(), HTTP: e.httpc}
	keys, err := f.Fetch(ctx, "he", 1)
	if err != nil {
		t.Fatal(err)
	}
	if q := keys.CKKS.Q(); len(q) != 3 || q[0] < 1<<54 {
		t.Fatalf("the SDK read moduli %v", q)
	}
}

// TestKeyETag: GET /v1/keys/{name} answers 304 to its own ETag until the
// key changes (a rotation, a state change).
func TestKeyETag(t *testing.T) {
	e := newEnv(t)
	c := e.client(e.admin)
	if _, err := c.CreateKey(ctx, client.CreateKeyRequest{Name: "k", Kind: "ml-dsa-44"}); err != nil {
		t.Fatal(err)
	}
	k, etag, err := c.GetKeyIfChanged(ctx, "k", 10, "")
	if err != nil || k == nil || etag == "" {
		t.Fatalf("first poll: %v %q %v", k, etag, err)
	}
	if k2, etag2, err := c.GetKeyIfChanged(ctx, "k", 10, etag); err != nil || k2 != nil || etag2 != etag {
		t.Fatalf("unchanged: %v %q %v", k2, etag2, err)
	}
	c.Rotate(ctx, "k")
	k3, etag3, err := c.GetKeyIfChanged(ctx, "k", 10, etag)
	if err != nil || k3 == nil || k3.PrimaryVersion != 2 || etag3 == etag {
		t.Fatalf("after a rotation: %+v %q %v", k3, etag3, err)
	}
	c.VersionAction(ctx, "k", 1, "disable", 0)
	if k4, etag4, _ := c.GetKeyIfChanged(ctx, "k", 10, etag3); k4 == nil || etag4 == etag3 {
		t.Fatal("a disabled version did not change the ETag")
	}
}
