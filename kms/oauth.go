package kms

import (
	"context"
	"errors"
	"slices"
	"strings"
	"time"
)

// OAuth 2.0 client credentials (RFC 6749 4.4) with resource indicators
// (RFC 8707): a worker or encryptor token is the client (its id the
// client_id, the token the client_secret) and gets short-lived access
// tokens bound to one resource (an MCP server's canonical URL), of its own
// role, for its keys or fewer, expiring no later than itself. An access
// token is an ordinary token record naming its client; it stops working
// when its client is revoked, and can never itself be a client (whoever
// it is presented to, an MCP server, holds it and must not be able to mint
// more).

// DefaultAccessTokenTTL is the lifetime of an access token when the server
// sets none.
const DefaultAccessTokenTTL = 15 * time.Minute

// OAuth error codes (RFC 6749 5.2, RFC 8707 2).
const (
	OAuthInvalidRequest     = "invalid_request"
	OAuthInvalidClient      = "invalid_client"
	OAuthUnauthorizedClient = "unauthorized_client"
	OAuthInvalidScope       = "invalid_scope"
	OAuthInvalidTarget      = "invalid_target"
)

// OAuthError is a refusal of the token endpoint: Code is the RFC 6749
// error code, Msg the description (safe to show the client).
type OAuthError struct {
	Code string
	Msg  string
}

func (e *OAuthError) Error() string { return e.Code + ": " + e.Msg }

func oauthErr(code, msg string) error { return &OAuthError{Code: code, Msg: msg} }

// AccessTokenRequest is a client credentials grant.
type AccessTokenRequest struct {
	ClientID, ClientSecret string
	// Resource is the RFC 8707 resource ("" if the request named none:
	// then the client's own audience, if it holds exactly one resource).
	Resource string
	// Scope is the space-separated scope asked for: the client's role,
	// and "key:<pattern>" for each key pattern wanted (within the
	// client's); no key scope: the client's patterns. Other roles' scopes
	// are ignored (the answer's scope says what was granted).
	Scope string
}

// MaxScopeLen bounds a scope parameter.
const MaxScopeLen = 4096

// Scope is the scope string of a token of role and key patterns.
func Scope(role Role, keys []string) string {
	parts := []string{string(role)}
	for _, k := range keys {
		parts = append(parts, "key:"+k)
	}
	return strings.Join(parts, " ")
}

// clientToken authenticates an OAuth client: id and secret are the
// token's id and the whole token. It reads the store, not the cache: a
// client revoked a moment ago gets nothing. A refused client whose secret
// matched is returned with the error.
func (s *Service) clientToken(ctx context.Context, id, secret string, now time.Time) (*Token, error) {
	bad := oauthErr(OAuthInvalidClient, "client authentication failed: the client_id is a kmsd token's id and the client_secret the token")
	tid, sec, ok := parseToken(secret)
	if !ok || !ValidTokenID(id) || tid != id {
		return nil, bad
	}
	t, err := s.store.GetToken(ctx, id)
	if errors.Is(err, ErrNotFound) {
		return nil, bad
	}
	if err != nil {
		return nil, asUnavailable("store", err)
	}
	if !t.matches(sec) {
		return nil, bad
	}
	// The secret holder may learn why its own client is refused, and
	// the record names the token from here on.
	switch {
	case t.RevokedAt != nil:
		return t, oauthErr(OAuthInvalidClient, "this client's token was revoked")
	case t.Expired(now):
		return t, oauthErr(OAuthInvalidClient, "this client's token has expired")
	case t.Client != "":
		return t, oauthErr(OAuthUnauthorizedClient, "an access token cannot obtain access tokens: authenticate with the client's own token")
	case t.Role != RoleWorker && t.Role != RoleEncryptor:
		return t, oauthErr(OAuthUnauthorizedClient, "only worker and encryptor tokens are OAuth clients (the parties that use MCP servers); this token is "+string(t.Role))
	}
	return t, nil
}

// IssueAccessToken runs the client credentials grant: it authenticates
// the client, checks the resource and scope, and stores a new token for
// the resource with the client's role and the patterns asked (its own by
// default), living ttl at most and never past the client. The request's
// audit record (in c) is written with the token, naming it; the client's
// principal is returned for the record's actor even on refusal, once the
// client authenticated.
//
// allow, if set, is asked once the client authenticated (the caller's
// rate limit per client); its error is returned as it is.
func (c Call) IssueAccessToken(ctx context.Context, req AccessTokenRequest, ttl time.Duration, allow func(clientID string) error) (string, *Token, *Principal, error) {
	s := c.Service
	now := s.clock.Now()
	cl, err := s.clientToken(ctx, req.ClientID, req.ClientSecret, now)
	var p *Principal
	if cl != nil {
		p = &Principal{TokenID: cl.ID, Role: cl.Role, Keys: cl.Keys, ExpiresAt: cl.ExpiresAt, Audience: cl.Audience}
		if c.rec != nil {
			// The request authenticated no bearer: its record's actor is
			// the client, from here (the issued token's record commits
			// with it).
			c.rec.Actor, c.rec.Role = cl.ID, string(cl.Role)
		}
	}
	if err != nil {
		return "", nil, p, err
	}
	if allow != nil {
		if err := allow(cl.ID); err != nil {
			return "", nil, p, err
		}
	}
	resource := req.Resource
	switch {
	case resource == "" && len(cl.Audience) == 1:
		resource = cl.Audience[0]
	case resource == "":
		return "", nil, p, oauthErr(OAuthInvalidTarget, "give the resource (RFC 8707): the canonical URL of the MCP server the token is for")
	}
	if err := validAudience(resource); err != nil {
		return "", nil, p, oauthErr(OAuthInvalidTarget, PublicMessage(err))
	}
	if len(cl.Audience) > 0 && !slices.Contains(cl.Audience, resource) {
		return "", nil, p, oauthErr(OAuthInvalidTarget, "this client may obtain tokens only for its audience: "+strings.Join(cl.Audience, " "))
	}
	keys, err := scopeKeys(cl, req.Scope)
	if err != nil {
		return "", nil, p, err
	}
	exp := now.Add(ttl)
	if cl.ExpiresAt != nil && exp.After(*cl.ExpiresAt) {
		exp = *cl.ExpiresAt
	}
	id, tok, hash, err := newTokenSecret(s.rand)
	if err != nil {
		return "", nil, p, Wrap(KindInternal, "token", err)
	}
	t := &Token{ID: id, Name: "oauth access token", Role: cl.Role, Keys: keys, Hash: hash, CreatedAt: now, CreatedBy: cl.ID,
		ExpiresAt: &exp, Audience: []string{resource}, Client: cl.ID}
	if err := s.store.CreateToken(ctx, t, auditForToken(c.rec, id)); err != nil {
		return "", nil, p, asUnavailable("store", err)
	}
	return tok, t, p, nil
}

// scopeKeys reads a scope parameter against the client: the key patterns
// granted (the client's when none is asked).
func scopeKeys(cl *Token, scope string) ([]string, error) {
	if len(scope) > MaxScopeLen {
		return nil, oauthErr(OAuthInvalidScope, "the scope is too long")
	}
	// Read and count everything before any pattern is checked: a check
	// costs a search over the client's patterns.
	var keys []string
	for _, sc := range strings.Fields(scope) {
		if k, ok := strings.CutPrefix(sc, "key:"); ok {
			if !scopePattern(k) {
				return nil, oauthErr(OAuthInvalidScope, "a key scope is key:NAME or key:PREFIX* (a key name, or a prefix of one and a final *); not shown")
			}
			if !slices.Contains(keys, k) {
				keys = append(keys, k)
			}
			if len(keys) > 64 {
				return nil, oauthErr(OAuthInvalidScope, "at most 64 key scopes")
			}
			continue
		}
		if ValidateRole(Role(sc)) == nil {
			continue // another role than the client's: not granted (the answer's scope says so)
		}
		return nil, oauthErr(OAuthInvalidScope, "unknown scope (not shown): scopes are worker, encryptor and key:<pattern>")
	}
	for _, k := range keys {
		if ok, _ := PatternsContain(cl.Keys, k); !ok {
			return nil, oauthErr(OAuthInvalidScope, "scope key:"+k+" reaches beyond this client's keys")
		}
	}
	if len(keys) == 0 {
		keys = cl.Keys
	}
	return keys, nil
}

// scopePattern reports whether k is a key scope's pattern: a key name, or
// a prefix of one followed by a single final "*" ("*" alone: every key).
// Nothing else of the glob syntax: the patterns an access token holds are
// searched at each introspection, so their cost is bounded here.
func scopePattern(k string) bool {
	prefix, star := strings.CutSuffix(k, "*")
	if len(k) == 0 || len(k) > 64 {
		return false
	}
	for i := 0; i < len(prefix); i++ {
		c := prefix[i]
		if !('a' <= c && c <= 'z' || '0' <= c && c <= '9' || (i > 0 && strings.IndexByte("._-", c) >= 0)) {
			return false
		}
	}
	return star || len(prefix) > 0
}

// AccessTokenRetention is how long an expired access token's record is
// kept before PruneAccessTokens removes it (its audit records stay).
const AccessTokenRetention = time.Hour

// PruneAccessTokens removes the records of access tokens that expired
// more than AccessTokenRetention ago, a transaction of at most 100 at a
// time, each with an audit record naming the token. A client asking for a
// token every few minutes would otherwise add tens of thousands of
// records a year that every token listing reads. Other tokens are kept:
// their records are the inventory of credentials an admin made.
func (s *Service) PruneAccessTokens(ctx context.Context) (int, error) {
	cutoff := s.clock.Now().Add(-AccessTokenRetention)
	pruned, after := 0, ""
	for {
		batch, err := s.store.ListTokens(ctx, after, 500)
		if err != nil {
			return pruned, asUnavailable("store", err)
		}
		var ids []string
		for _, t := range batch {
			after = t.ID
			if t.Client != "" && t.ExpiresAt != nil && t.ExpiresAt.Before(cutoff) {
				ids = append(ids, t.ID)
			}
		}
		for len(ids) > 0 {
			n := min(len(ids), 100)
			var recs []*AuditRecord
			for _, id := range ids[:n] {
				for _, r := range s.systemRecord("prune expired access token", "", 0) {
					r.Token = id
					recs = append(recs, r)
				}
			}
			if err := s.store.DeleteTokens(ctx, ids[:n], recs); err != nil {
				return pruned, asUnavailable("store", err)
			}
			pruned += n
			ids = ids[n:]
		}
		if len(batch) < 500 {
			return pruned, nil
		}
	}
}
