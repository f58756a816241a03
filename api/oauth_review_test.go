package api_test

import (
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/kmsd-project/kmsd/api/client"
	"github.com/kmsd-project/kmsd/kms"
)

// Regression tests for the outside review of the token endpoint.

// TestOAuthScopePatternsBounded: a key scope is a key name or a prefix
// and a final "*"; anything else of the glob syntax is refused before any
// search (the review's scope=key:team-*a???????????????? twice took 7.8 s
// and 923 MiB, and its access token cost seconds at each introspection),
// and at most 64 distinct key scopes are read, counted before any check.
func TestOAuthScopePatternsBounded(t *testing.T) {
	e := newEnv(t)
	admin := e.client(e.admin)
	cl, _ := admin.CreateToken(ctx, client.CreateTokenRequest{Role: "worker", Keys: []string{"team-*"}, TTL: "2h"})
	const res = "https://mcp.example.net/mcp"
	form := func(scope string) url.Values {
		return url.Values{"grant_type": {"client_credentials"}, "resource": {res}, "scope": {scope}}
	}
	heavy := "key:team-*a" + strings.Repeat("?", 16)
	many := ""
	for i := range 65 {
		many += fmt.Sprintf(" key:team-%d", i)
	}
	for name, c := range map[string]struct {
		scope, want string
		status      int
	}{
		"the review's pattern, twice": {heavy + " " + heavy, "invalid_scope", 400},
		"a star inside":               {"key:team-*-prod", "invalid_scope", 400},
		"a class":                     {"key:team-[a-b]", "invalid_scope", 400},
		"a question mark":             {"key:team-?", "invalid_scope", 400},
		"65 key scopes":               {many, "invalid_scope", 400},
		"a name":                      {"key:team-a", "", 200},
		"a prefix and a star":         {"key:team-a*", "", 200},
		"the client's own pattern":    {"key:team-*", "", 200},
		"beyond the client":           {"key:other*", "invalid_scope", 400},
	} {
		st, _, out := e.tokenRequest(cl.ID, cl.Token, form(c.scope), formType)
		if st != c.status || (c.want != "" && out["error"] != c.want) {
			t.Errorf("%s: %d %v", name, st, out)
		}
	}
}

// TestOAuthIssuanceLimitedAndPruned: a client gets at most a burst of 10
// access tokens, then one every 10 s (429 with Retry-After past it: the
// review's client minted 40 records at once, none ever removed), and the
// records of access tokens expired for over an hour are pruned, each with
// an audit record, while every other token stays.
func TestOAuthIssuanceLimitedAndPruned(t *testing.T) {
	for _, b := range backends {
		t.Run(b, func(t *testing.T) { testIssuanceLimitedAndPruned(t, newEnvOn(t, b, nil, nil, nil)) })
	}
}

func testIssuanceLimitedAndPruned(t *testing.T, e *env) {
	admin := e.client(e.admin)
	cl, _ := admin.CreateToken(ctx, client.CreateTokenRequest{Role: "worker", Keys: []string{"team-a"}})
	other, _ := admin.CreateToken(ctx, client.CreateTokenRequest{Role: "worker", Keys: []string{"team-a"}, TTL: "1m"}) // expires, is not an access token
	ok := url.Values{"grant_type": {"client_credentials"}, "resource": {"https://mcp.example.net/mcp"}}
	before, _ := e.store.CountTokens(ctx)
	issued, limited := 0, 0
	var ids []string
	for range 14 {
		st, h, out := e.tokenRequest(cl.ID, cl.Token, ok, formType)
		switch st {
		case 200:
			issued++
			in, _ := admin.IntrospectToken(ctx, out["access_token"].(string))
			ids = append(ids, in.TokenID)
		case 429:
			limited++
			if h.Get("Retry-After") == "" {
				t.Error("429 without Retry-After")
			}
		default:
			t.Fatalf("%d %v", st, out)
		}
	}
	if issued != 10 || limited != 4 {
		t.Fatalf("14 requests at once: %d issued, %d limited; want 10 and 4", issued, limited)
	}
	// Another client is not limited by this one.
	cl2, _ := admin.CreateToken(ctx, client.CreateTokenRequest{Role: "worker", Keys: []string{"team-a"}})
	if st, _, out := e.tokenRequest(cl2.ID, cl2.Token, ok, formType); st != 200 {
		t.Fatalf("another client: %d %v", st, out)
	}
	// Nothing to prune before an hour past expiry.
	if n, err := e.svc.PruneAccessTokens(ctx); err != nil || n != 0 {
		t.Fatalf("prune of live tokens: %d %v", n, err)
	}
	e.clock.Add(15*time.Minute + kms.AccessTokenRetention + time.Second)
	n, err := e.svc.PruneAccessTokens(ctx)
	if err != nil || n != 11 {
		t.Fatalf("prune: %d %v, want the 11 access tokens", n, err)
	}
	// The store's integrity digest followed the deletions.
	var scrubErr error
	if e.etcd != nil {
		_, scrubErr = e.etcd.Scrub(ctx)
	} else {
		_, scrubErr = e.bolt.Scrub(ctx)
	}
	if scrubErr != nil {
		t.Fatalf("scrub after the prune: %v", scrubErr)
	}
	after, _ := e.store.CountTokens(ctx)
	if after != before+1 { // cl2
		t.Fatalf("%d token records after the prune, want %d", after, before+1)
	}
	for _, id := range []string{cl.ID, other.ID} {
		if _, err := admin.GetToken(ctx, id); err != nil {
			t.Errorf("token %s, not an access token, was pruned: %v", id, err)
		}
	}
	pruned := map[string]bool{}
	for _, line := range e.auditLog() {
		if r, err := kms.DecodeAuditRecord(line); err == nil && r.Operation == "prune expired access token" && r.Actor == "system" {
			pruned[r.Token] = true
		}
	}
	for _, id := range ids {
		if !pruned[id] {
			t.Errorf("no audit record of the pruning of %s", id)
		}
	}
}

// TestOAuthDuplicateParamNotEchoed: a token pasted twice as the body is
// refused without any of it in the answer (the review got its id and 19
// characters of its secret back).
func TestOAuthDuplicateParamNotEchoed(t *testing.T) {
	e := newEnv(t)
	cl, _ := e.client(e.admin).CreateToken(ctx, client.CreateTokenRequest{Role: "worker", Keys: []string{"team-a"}})
	req, _ := http.NewRequest("POST", e.url+"/v1/oauth/token", strings.NewReader("grant_type=client_credentials&"+cl.Token+"&"+cl.Token))
	req.Header.Set("Content-Type", formType)
	req.Header.Set("Authorization", "Basic "+base64.StdEncoding.EncodeToString([]byte(cl.ID+":"+cl.Token)))
	resp, err := e.httpc.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var out map[string]any
	json.NewDecoder(resp.Body).Decode(&out)
	if desc, _ := out["error_description"].(string); resp.StatusCode != 400 || strings.Contains(desc, cl.ID) || strings.Contains(desc, cl.Token[len("kms_")+17:][:8]) {
		t.Fatalf("%d: %q", resp.StatusCode, desc)
	}
}

// TestOAuthTricksRefused: what the review tried that held: separators and
// globs that widen a scope, resources of the wrong shape, two
// Authorization headers, an access token at kmsd's own endpoints.
func TestOAuthTricksRefused(t *testing.T) {
	e := newEnv(t)
	admin := e.client(e.admin)
	cl, _ := admin.CreateToken(ctx, client.CreateTokenRequest{Role: "worker", Keys: []string{"team-a*"}, TTL: "1h"})
	const res = "https://mcp.example.net/mcp"
	form := func(kv ...string) url.Values {
		v := url.Values{"grant_type": {"client_credentials"}, "resource": {res}}
		for i := 0; i < len(kv); i += 2 {
			v.Set(kv[i], kv[i+1])
		}
		return v
	}
	for name, f := range map[string]url.Values{
		"NBSP-separated wider pattern": form("scope", "key:team-a\u00a0key:*"),
		"tab-separated wider pattern":  form("scope", "key:team-a\tkey:team-*"),
		"escaped star":                 form("scope", `key:team-a\*`),
		"upper case":                   form("scope", "key:TEAM-A*"),
		"full-width star":              form("scope", "key:team-a\uff0a"),
		"resource with userinfo":       form("resource", "https://u:p@mcp.example.net/mcp"),
		"resource with a query":        form("resource", "https://mcp.example.net/mcp?x=1"),
		"resource of IPv6 unspecified": form("resource", "https://[::]:8421/mcp"),
		"client_id of another token":   form("client_id", "0123456789abcdef"),
		"scope over 4096 bytes":        form("scope", strings.Repeat("worker ", 700)),
	} {
		if st, _, out := e.tokenRequest(cl.ID, cl.Token, f, formType); st == 200 {
			t.Errorf("%s: granted %v", name, out)
		}
	}
	req, _ := http.NewRequest("POST", e.url+"/v1/oauth/token", strings.NewReader(form().Encode()))
	req.Header.Set("Content-Type", formType)
	req.Header.Add("Authorization", "Bearer "+e.admin)
	req.Header.Add("Authorization", "Basic "+base64.StdEncoding.EncodeToString([]byte(cl.ID+":"+cl.Token)))
	resp, err := e.httpc.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode == 200 {
		t.Error("two Authorization headers: a token was issued")
	}
	st, _, out := e.tokenRequest(cl.ID, cl.Token, form(), formType)
	if st != 200 {
		t.Fatal(out)
	}
	at := out["access_token"].(string)
	for _, c := range []struct{ method, path, body string }{
		{"POST", "/v1/tokens/self/renew", ""},
		{"POST", "/v1/tokens/introspect", `{"token":"` + at + `"}`},
		{"GET", "/v1/tokens", ""},
		{"GET", "/v1/keys", ""},
	} {
		if st, _, _ := e.raw(c.method, c.path, at, "application/json", c.body); st != 401 {
			t.Errorf("the access token at %s %s: %d", c.method, c.path, st)
		}
	}
}
