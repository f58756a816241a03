package api

import (
	"encoding/base64"
	"errors"
	"io"
	"math"
	"mime"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/kmsd-project/kmsd/api/client"
	"github.com/kmsd-project/kmsd/kms"
)

// OAuthOptions configure kmsd as an OAuth 2.0 authorization server for
// MCP clients: RFC 8414 metadata and a token endpoint with the client
// credentials grant only.
type OAuthOptions struct {
	// Issuer is kmsd's URL as clients reach it (https://host[:port], no
	// path); "" serves the token endpoint but no metadata (404).
	Issuer string
	// AccessTokenTTL is an access token's lifetime (default 15 minutes),
	// capped by its client's expiry.
	AccessTokenTTL time.Duration
}

// TokenEndpoint is the path of the OAuth token endpoint.
const TokenEndpoint = "/v1/oauth/token"

// AuthorizeEndpoint is the path of the authorization endpoint the
// metadata names: kmsd grants no authorization code, so it answers every
// request with a refusal.
const AuthorizeEndpoint = "/v1/oauth/authorize"

// oauthAuthorize refuses: kmsd issues tokens by the client credentials
// grant only (no user, no redirect). The refusal is not redirected: no
// client registered a redirect URI (RFC 6749 4.1.2.1).
func (s *Server) oauthAuthorize(w http.ResponseWriter, r *http.Request) {
	writeProblem(w, r, http.StatusBadRequest, ProbInvalid, "kmsd grants no authorization code: obtain tokens at "+TokenEndpoint+" with the client credentials grant")
}

// maxTokenRequest bounds a token request's body: a grant type, a resource
// URI and a scope.
const maxTokenRequest = 8 << 10

// oauthMetadata serves the authorization server metadata (RFC 8414 2).
func (s *Server) oauthMetadata(w http.ResponseWriter, r *http.Request) {
	iss := s.opts.OAuth.Issuer
	if iss == "" {
		writeProblem(w, r, http.StatusNotFound, ProbNotFound, "kmsd has no issuer URL: start it with --issuer https://host:port (the URL clients reach it at) to serve OAuth metadata")
		return
	}
	w.Header().Set("Cache-Control", "max-age=300")
	writeJSON(w, http.StatusOK, client.AuthServerMetadata{
		Issuer:                            iss,
		TokenEndpoint:                     iss + TokenEndpoint,
		GrantTypesSupported:               []string{"client_credentials"},
		TokenEndpointAuthMethodsSupported: []string{"client_secret_basic"},
		ScopesSupported:                   []string{string(kms.RoleWorker), string(kms.RoleEncryptor)},
		// No authorization endpoint, so no response type; S256 is named
		// because MCP clients refuse an authorization server that does
		// not say it would require PKCE for the code flow it would run.
		ResponseTypesSupported:        []string{},
		CodeChallengeMethodsSupported: []string{"S256"},
		// Named because MCP client SDKs (the TypeScript one) refuse
		// metadata without it; it issues nothing (authorize).
		AuthorizationEndpoint: iss + AuthorizeEndpoint,
		IntrospectionEndpoint: iss + "/v1/tokens/introspect",
		ServiceDocumentation:  "https://github.com/kmsd-project/kmsd#mcp-clients-obtain-tokens-oauth",
	})
}

// oauthError answers a refused token request (RFC 6749 5.2): its JSON
// holds error and error_description, and, for kmsd's clients, the
// problem fields.
func oauthError(w http.ResponseWriter, r *http.Request, code, desc string) {
	oauthErrorStatus(w, r, http.StatusBadRequest, code, desc)
}

// oauthErrorStatus is oauthError with another status than 400 for
// invalid_request: 413 for a body over the limit, 415 for one that is not
// a form.
func oauthErrorStatus(w http.ResponseWriter, r *http.Request, status int, code, desc string) {
	if code == kms.OAuthInvalidClient {
		status = http.StatusUnauthorized
		w.Header().Set("WWW-Authenticate", `Basic realm="kmsd", charset="UTF-8"`)
	}
	ev := eventFrom(r)
	typ := "oauth-" + code
	out := client.OAuthError{Error: code, Description: desc, Problem: client.Problem{Type: ProblemBase + typ, Title: "The token request was refused", Status: status, Detail: desc, Instance: TokenEndpoint}}
	if ev != nil {
		ev.problem, out.RequestID = typ, ev.id
	}
	w.Header().Set("Pragma", "no-cache")
	writeJSON(w, status, out)
}

// oauthToken is the token endpoint: client_credentials only, the client
// authenticated with HTTP Basic (client_secret_basic). Every answer has
// its audit record; an issued token's record names it and commits with
// it.
func (s *Server) oauthToken(w http.ResponseWriter, r *http.Request) {
	ev := eventFrom(r)
	w.Header().Set("Cache-Control", "no-store")
	if mt, _, err := mime.ParseMediaType(r.Header.Get("Content-Type")); err != nil || mt != "application/x-www-form-urlencoded" {
		oauthErrorStatus(w, r, http.StatusUnsupportedMediaType, kms.OAuthInvalidRequest, "the body must be application/x-www-form-urlencoded (RFC 6749 4.4.2)")
		return
	}
	body, err := io.ReadAll(http.MaxBytesReader(nil, r.Body, maxTokenRequest))
	ev.bytesIn = len(body)
	var mbe *http.MaxBytesError
	switch {
	case errors.As(err, &mbe):
		oauthErrorStatus(w, r, http.StatusRequestEntityTooLarge, kms.OAuthInvalidRequest, "the body is larger than 8 KiB")
		return
	case err != nil:
		oauthError(w, r, kms.OAuthInvalidRequest, "the body could not be read")
		return
	}
	form, err := url.ParseQuery(string(body))
	if err != nil {
		oauthError(w, r, kms.OAuthInvalidRequest, "the body is not form-encoded")
		return
	}
	for name, vs := range form {
		switch {
		case len(vs) > 1:
			oauthError(w, r, kms.OAuthInvalidRequest, "a parameter is given more than once (RFC 6749 3.2; not shown)")
			return
		case name == "client_secret":
			oauthError(w, r, kms.OAuthInvalidRequest, "give the client's credentials in the Authorization header (HTTP Basic, client_secret_basic), never in the body")
			return
		case name != "grant_type" && name != "resource" && name != "scope" && name != "client_id":
			oauthError(w, r, kms.OAuthInvalidRequest, "unknown parameter (not shown): the client credentials grant takes grant_type, resource and scope")
			return
		}
	}
	if g := form.Get("grant_type"); g != "client_credentials" {
		oauthError(w, r, "unsupported_grant_type", "kmsd issues tokens by the client_credentials grant only")
		return
	}
	id, secret, ok := basicAuth(r)
	if !ok {
		oauthError(w, r, kms.OAuthInvalidClient, "client authentication is required: HTTP Basic with the token's id as client_id and the token as client_secret")
		return
	}
	if cid := form.Get("client_id"); cid != "" && cid != id {
		oauthError(w, r, kms.OAuthInvalidRequest, "client_id in the body is not the one authenticated")
		return
	}
	ttl := s.opts.OAuth.AccessTokenTTL
	if ttl <= 0 {
		ttl = kms.DefaultAccessTokenTTL
	}
	pending(r, http.StatusOK)
	tok, t, p, err := s.call(r).IssueAccessToken(r.Context(), kms.AccessTokenRequest{ClientID: id, ClientSecret: secret, Resource: form.Get("resource"), Scope: form.Get("scope")}, ttl,
		func(clientID string) error {
			// Per client, once it authenticated: an access token is a
			// record, and a client needs one per token lifetime.
			if ok, wait := s.issue.allow(clientID); !ok {
				return &retryAfter{wait}
			}
			return nil
		})
	if p != nil {
		// The client, once it authenticated, for the log (its record's
		// actor is set in IssueAccessToken).
		ev.tokenID, ev.principal = p.TokenID, p
	}
	var oe *kms.OAuthError
	var ra *retryAfter
	switch {
	case errors.As(err, &ra):
		w.Header().Set("Retry-After", strconv.Itoa(int(math.Ceil(ra.wait.Seconds()))))
		if s.opts.Metrics != nil {
			s.opts.Metrics.RateLimited("token")
		}
		writeProblem(w, r, http.StatusTooManyRequests, ProbRateLimited, "this client has asked for access tokens too often (one every 10 s, bursts of 10): reuse the one it has until it expires")
		return
	case errors.As(err, &oe):
		oauthError(w, r, oe.Code, oe.Msg)
		return
	case err != nil:
		writeError(w, r, err)
		return
	}
	w.Header().Set("Pragma", "no-cache")
	writeJSON(w, http.StatusOK, client.AccessToken{AccessToken: tok, TokenType: "Bearer",
		ExpiresIn: int64(t.ExpiresAt.Sub(t.CreatedAt) / time.Second), Scope: kms.Scope(t.Role, t.Keys)})
}

// Access tokens a client may obtain: one every issueEvery, bursts of
// issueBurst (per kmsd process). With pruning, a client holds at most
// about ttl/issueEvery + issueBurst token records.
const (
	issueEvery = 10 * time.Second
	issueBurst = 10
)

// retryAfter is a refusal past the issuance limit.
type retryAfter struct{ wait time.Duration }

func (e *retryAfter) Error() string { return "too many access tokens" }

// basicAuth reads client_secret_basic credentials: the id and secret are
// form-encoded before base64 (RFC 6749 2.3.1).
func basicAuth(r *http.Request) (id, secret string, ok bool) {
	scheme, enc, ok := strings.Cut(r.Header.Get("Authorization"), " ")
	if !ok || !strings.EqualFold(scheme, "Basic") || len(enc) > 1024 {
		return "", "", false
	}
	raw, err := base64.StdEncoding.DecodeString(strings.TrimSpace(enc))
	if err != nil {
		return "", "", false
	}
	u, p, ok := strings.Cut(string(raw), ":")
	if !ok {
		return "", "", false
	}
	if id, err = url.QueryUnescape(u); err != nil {
		return "", "", false
	}
	if secret, err = url.QueryUnescape(p); err != nil {
		return "", "", false
	}
	return id, secret, id != "" && secret != ""
}
