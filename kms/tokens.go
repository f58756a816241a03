package kms

import (
	"context"
	"errors"
	"net"
	"net/url"
	"slices"
	"sync"
	"time"
)

// TokenRequest is what a caller asks of a new token.
type TokenRequest struct {
	Name string
	Role Role
	Keys []string
	// TTL is how long the token lives; 0 means the server's maximum (or no
	// expiry when the server sets none), capped by the creator's expiry.
	TTL time.Duration
	// MaxLifetime, if set (with TTL), makes the token renewable: each
	// renewal extends it by TTL, never past creation + MaxLifetime
	// (bounded by the server's maximum token lifetime).
	MaxLifetime time.Duration
	// Audience binds the token to these resources (RFC 8707): absolute
	// https:// URIs (http:// to loopback), at most MaxAudience. A bound
	// token works only where its audience's server introspects it, never
	// at kmsd's own API.
	Audience []string
}

// MaxAudience bounds a token's audience.
const MaxAudience = 4

// validAudience checks one resource URI of an audience.
func validAudience(a string) error {
	u, err := url.Parse(a)
	if err != nil || len(a) > 512 || u.Host == "" || u.User != nil || u.Fragment != "" || u.RawQuery != "" || (u.Scheme != "https" && u.Scheme != "http") {
		return Errorf(KindInvalid, "audience %q: want an absolute https:// URI of a resource (an MCP server's URL), without credentials, query or fragment", clip(a, 60))
	}
	if ip := net.ParseIP(u.Hostname()); ip != nil && ip.IsUnspecified() {
		return Errorf(KindInvalid, "audience %q: a wildcard address is every server's: name the server by the URL its clients use", clip(a, 60))
	}
	if u.Scheme == "http" {
		if ip := net.ParseIP(u.Hostname()); u.Hostname() != "localhost" && (ip == nil || !ip.IsLoopback()) {
			return Errorf(KindInvalid, "audience %q: plain http:// only for a loopback address", clip(a, 60))
		}
	}
	return nil
}

// tokenUses remembers when each token last authenticated, between writes
// to the store (one transaction for all, by FlushTokenUse).
type tokenUses struct {
	mu sync.Mutex
	m  map[string]time.Time
}

func (u *tokenUses) note(id string, now time.Time) {
	u.mu.Lock()
	if u.m == nil {
		u.m = map[string]time.Time{}
	}
	if now.After(u.m[id]) {
		u.m[id] = now
	}
	u.mu.Unlock()
}

func (u *tokenUses) get(id string) (time.Time, bool) {
	u.mu.Lock()
	defer u.mu.Unlock()
	t, ok := u.m[id]
	return t, ok
}

func (u *tokenUses) take() map[string]time.Time {
	u.mu.Lock()
	defer u.mu.Unlock()
	m := u.m
	u.m = nil
	return m
}

// CreateToken makes a bearer token with a role and key patterns on behalf of
// creator. The new token may hold only what creator holds: a role whose
// permissions creator's role has, patterns within creator's, and an expiry
// no later than creator's. Auditor tokens read the whole log, so they take
// the pattern "*" only. The token text is returned once and stored only as
// a hash.
func (c Call) CreateToken(ctx context.Context, creator *Principal, req TokenRequest) (string, *Token, error) {
	s := c.Service
	if creator == nil {
		return "", nil, Errorf(KindUnauthenticated, "a bearer token is required")
	}
	if len(req.Name) > 128 {
		return "", nil, Errorf(KindInvalid, "token name must be at most 128 characters")
	}
	if err := ValidateRole(req.Role); err != nil {
		return "", nil, err
	}
	if err := ValidatePatterns(req.Keys); err != nil {
		return "", nil, err
	}
	if req.Role == RoleAuditor && !slices.Equal(req.Keys, []string{"*"}) {
		return "", nil, Errorf(KindInvalid, "an auditor token reads the whole audit log (a part of it could not be verified): its keys must be [\"*\"]")
	}
	if req.TTL < 0 || (req.TTL > 0 && req.TTL < time.Second) {
		return "", nil, Errorf(KindInvalid, "ttl must be at least 1s")
	}
	if s.maxTokenTTL > 0 && req.TTL > s.maxTokenTTL {
		return "", nil, Errorf(KindInvalid, "ttl %s exceeds the server's maximum token lifetime of %s", req.TTL, s.maxTokenTTL)
	}
	if req.MaxLifetime != 0 {
		if req.TTL == 0 || req.MaxLifetime < req.TTL {
			return "", nil, Errorf(KindInvalid, "max_lifetime needs a ttl, and is at least the ttl")
		}
		if s.maxTokenTTL > 0 && req.MaxLifetime > s.maxTokenTTL {
			return "", nil, Errorf(KindInvalid, "max_lifetime %s exceeds the server's maximum token lifetime of %s", req.MaxLifetime, s.maxTokenTTL)
		}
	}
	now := s.clock.Now()
	var exp *time.Time
	switch {
	case req.TTL > 0:
		t := now.Add(req.TTL)
		exp = &t
	case s.maxTokenTTL > 0:
		t := now.Add(s.maxTokenTTL)
		exp = &t
	}
	if req.TTL == 0 && creator.ExpiresAt != nil && (exp == nil || exp.After(*creator.ExpiresAt)) {
		t := *creator.ExpiresAt // no ttl asked: live as long as the creator at most
		exp = &t
	}
	var maxExp *time.Time
	if req.MaxLifetime > 0 {
		t := now.Add(req.MaxLifetime)
		maxExp = &t
	}
	// Renewals included, a token lives no longer than its creator.
	latest := exp
	if maxExp != nil {
		latest = maxExp
	}
	if err := creator.covers(req.Role, req.Keys, latest); err != nil {
		return "", nil, err
	}
	if len(req.Audience) > 0 && req.MaxLifetime > 0 {
		return "", nil, Errorf(KindInvalid, "an audience-bound token does not renew (it does nothing at kmsd, where renewals are made): give it a ttl, and a new token when it ends")
	}
	if len(req.Audience) > MaxAudience {
		return "", nil, Errorf(KindInvalid, "a token's audience holds at most %d resources", MaxAudience)
	}
	for _, a := range req.Audience {
		if err := validAudience(a); err != nil {
			return "", nil, err
		}
	}
	id, tok, hash, err := newTokenSecret(s.rand)
	if err != nil {
		return "", nil, Wrap(KindInternal, "token", err)
	}
	t := &Token{ID: id, Name: req.Name, Role: req.Role, Keys: req.Keys, Hash: hash, CreatedAt: now, CreatedBy: creator.TokenID, ExpiresAt: exp, Audience: req.Audience}
	if maxExp != nil {
		t.TTL, t.MaxExpiresAt = req.TTL, maxExp
	}
	if err := s.store.CreateToken(ctx, t, auditForToken(c.rec, id)); err != nil {
		return "", nil, asUnavailable("store", err)
	}
	return tok, t, nil
}

// CreateToken is For(nil).CreateToken.
func (s *Service) CreateToken(ctx context.Context, creator *Principal, req TokenRequest) (string, *Token, error) {
	return s.For(nil).CreateToken(ctx, creator, req)
}

// EnsureAdminToken creates an admin token for all keys when the store has no
// token at all (first start). persist is called with the token text before
// the token is stored, so a token is never valid unless it was written down;
// if storing fails, the next start makes a new one. If another process
// made the first token meanwhile (replicas starting at once on an empty
// store), persist is called again with "" to withdraw the unused text. It
// returns whether a token was made.
func (s *Service) EnsureAdminToken(ctx context.Context, persist func(token string) error) (bool, error) {
	n, err := s.store.CountTokens(ctx)
	if err != nil {
		return false, asUnavailable("store", err)
	}
	if n > 0 {
		return false, nil
	}
	id, tok, hash, err := newTokenSecret(s.rand)
	if err != nil {
		return false, Wrap(KindInternal, "token", err)
	}
	if err := persist(tok); err != nil {
		return false, err
	}
	t := &Token{ID: id, Name: "bootstrap admin", Role: RoleAdmin, Keys: []string{"*"}, Hash: hash, CreatedAt: s.clock.Now(), CreatedBy: "system"}
	if err := s.store.CreateFirstToken(ctx, t, s.systemRecord("create bootstrap admin token "+id, "", 0)); err != nil {
		if errors.Is(err, ErrAlreadyExists) {
			// Another replica starting on the same empty store made the
			// first token: this one's secret opens nothing.
			return false, persist("")
		}
		return false, asUnavailable("store", err)
	}
	return true, nil
}

// Authenticate maps a presented bearer token to its principal. Revoked and
// expired tokens are refused (expired with KindExpired).
func (s *Service) Authenticate(ctx context.Context, token string) (*Principal, error) {
	id, secret, ok := parseToken(token)
	if !ok {
		return nil, Errorf(KindUnauthenticated, "malformed bearer token")
	}
	t, err := s.cachedToken(ctx, id)
	if errors.Is(err, ErrNotFound) {
		return nil, Errorf(KindUnauthenticated, "unknown bearer token")
	}
	if err != nil {
		return nil, asUnavailable("store", err)
	}
	if !t.matches(secret) {
		return nil, Errorf(KindUnauthenticated, "unknown bearer token")
	}
	// Only the holder of the secret learns why a known token is refused.
	now := s.clock.Now()
	if t.RevokedAt != nil {
		return nil, Errorf(KindUnauthenticated, "this bearer token was revoked")
	}
	if t.Expired(now) {
		return nil, Errorf(KindExpired, "this bearer token expired at %s", t.ExpiresAt.UTC().Format(time.RFC3339))
	}
	if len(t.Audience) > 0 {
		// No passthrough: a token for another resource does nothing here.
		return nil, Errorf(KindUnauthenticated, "this bearer token is bound to another resource (its audience): it works only there")
	}
	s.uses.note(t.ID, now)
	return &Principal{TokenID: t.ID, Role: t.Role, Keys: t.Keys, ExpiresAt: t.ExpiresAt}, nil
}

// Introspect says whether token is active (known, its secret right, not
// revoked, not expired) and, if so, what it may do (RFC 7662). An inactive
// token is (nil, nil), whatever the reason: the caller learns nothing more
// than the holder could. It does not count as a use of the token.
func (s *Service) Introspect(ctx context.Context, token string) (*Principal, error) {
	id, secret, ok := parseToken(token)
	if !ok {
		return nil, nil
	}
	t, err := s.cachedToken(ctx, id)
	if errors.Is(err, ErrNotFound) {
		return nil, nil
	}
	if err != nil {
		return nil, asUnavailable("store", err)
	}
	now := s.clock.Now()
	if !t.matches(secret) || !t.Active(now) {
		return nil, nil
	}
	if t.Client != "" {
		// An access token works while its client does: revoking the
		// client revokes what it obtained.
		cl, err := s.cachedToken(ctx, t.Client)
		if errors.Is(err, ErrNotFound) {
			return nil, nil
		}
		if err != nil {
			return nil, asUnavailable("store", err)
		}
		if !cl.Active(now) {
			return nil, nil
		}
	}
	return &Principal{TokenID: t.ID, Role: t.Role, Keys: t.Keys, ExpiresAt: t.ExpiresAt, Audience: t.Audience, Client: t.Client}, nil
}

// ValidTokenID checks a token id named from outside (16 hex digits).
func ValidTokenID(id string) bool {
	if len(id) != 16 {
		return false
	}
	for _, c := range id {
		if !('0' <= c && c <= '9' || 'a' <= c && c <= 'f') {
			return false
		}
	}
	return true
}

// withUse returns t with the newest use this process has seen.
func (s *Service) withUse(t *Token) *Token {
	if u, ok := s.uses.get(t.ID); ok && (t.LastUsedAt == nil || u.After(*t.LastUsedAt)) {
		t.LastUsedAt = &u
	}
	return t
}

// mayManage reports whether p may see and revoke t: t's role and patterns
// must be within p's. Expiry does not count here: an admin whose token
// expires must still be able to revoke a leaked token that does not.
func (p *Principal) mayManage(t *Token) bool {
	return p.covers(t.Role, t.Keys, p.ExpiresAt) == nil
}

// ListTokens returns up to limit tokens after the id `after` that p may
// manage, and the id to continue after ("" at the end).
func (s *Service) ListTokens(ctx context.Context, p *Principal, after string, limit int) ([]*Token, string, error) {
	if limit <= 0 || limit > 1000 {
		return nil, "", Errorf(KindInvalid, "limit must be between 1 and 1000")
	}
	var out []*Token
	for {
		batch, err := s.store.ListTokens(ctx, after, limit+1)
		if err != nil {
			return nil, "", asUnavailable("store", err)
		}
		for _, t := range batch {
			after = t.ID
			if !p.mayManage(t) {
				continue
			}
			if len(out) == limit {
				return out, out[len(out)-1].ID, nil
			}
			out = append(out, s.withUse(t))
		}
		if len(batch) < limit+1 {
			return out, "", nil
		}
	}
}

// GetToken returns a token's metadata if p may manage it; tokens beyond p
// are not found.
func (s *Service) GetToken(ctx context.Context, p *Principal, id string) (*Token, error) {
	if !ValidTokenID(id) {
		return nil, Errorf(KindInvalid, "a token id is 16 hexadecimal digits")
	}
	t, err := s.store.GetToken(ctx, id)
	if errors.Is(err, ErrNotFound) || (err == nil && !p.mayManage(t)) {
		return nil, Errorf(KindNotFound, "token %s not found", id)
	}
	if err != nil {
		return nil, asUnavailable("store", err)
	}
	return s.withUse(t), nil
}

// RevokeToken revokes a token p may manage: every later request with it is
// refused. The last active admin token for all keys cannot be revoked, so
// the service always keeps an administrator. Revoking twice is refused.
func (c Call) RevokeToken(ctx context.Context, p *Principal, id string) (*Token, error) {
	s := c.Service
	if !ValidTokenID(id) {
		return nil, Errorf(KindInvalid, "a token id is 16 hexadecimal digits")
	}
	// Revocations are serialized so two cannot each see the other's admin
	// token as the one that remains.
	s.revokeMu.Lock()
	defer s.revokeMu.Unlock()
	now := s.clock.Now()
	var out *Token
	err := s.store.UpdateToken(ctx, id, func(t *Token) ([]*AuditRecord, error) {
		if !p.mayManage(t) {
			return nil, Errorf(KindNotFound, "token %s not found", id)
		}
		if t.RevokedAt != nil {
			return nil, Errorf(KindFailedPrecondition, "token %s is already revoked", id)
		}
		if t.Role == RoleAdmin && allKeys(t.Keys) && t.Active(now) {
			others, err := s.otherRootAdmins(ctx, id, now)
			if err != nil {
				return nil, err
			}
			if others == 0 {
				return nil, Errorf(KindFailedPrecondition, "token %s is the last active admin token for all keys: create another before revoking it", id)
			}
		}
		t.RevokedAt = &now
		out = t
		return auditForToken(c.rec, id), nil
	})
	if errors.Is(err, ErrNotFound) && KindOf(err) != KindNotFound {
		return nil, Errorf(KindNotFound, "token %s not found", id)
	}
	if err != nil {
		return nil, asUnavailable("store", err)
	}
	return s.withUse(out), nil
}

// RenewToken extends the caller's own token by its ttl, never past its
// maximum lifetime: a token made without max_lifetime, or already at it,
// is refused (409). The caller authenticated with it, so it is neither
// revoked nor expired; the store transaction checks that again.
func (c Call) RenewToken(ctx context.Context, p *Principal) (*Token, error) {
	s := c.Service
	if p == nil {
		return nil, Errorf(KindUnauthenticated, "a bearer token is required")
	}
	now := s.clock.Now()
	var out *Token
	err := s.store.UpdateToken(ctx, p.TokenID, func(t *Token) ([]*AuditRecord, error) {
		switch {
		case t.RevokedAt != nil:
			return nil, Errorf(KindUnauthenticated, "this bearer token was revoked")
		case t.Expired(now):
			return nil, Errorf(KindExpired, "this bearer token has expired")
		case t.MaxExpiresAt == nil || t.TTL <= 0:
			return nil, Errorf(KindFailedPrecondition, "this token is not renewable: it was made without max_lifetime")
		}
		next := now.Add(t.TTL)
		if next.After(*t.MaxExpiresAt) {
			next = *t.MaxExpiresAt
		}
		if t.ExpiresAt != nil && !next.After(*t.ExpiresAt) {
			return nil, Errorf(KindFailedPrecondition, "this token is at its maximum lifetime (%s): make a new one", t.MaxExpiresAt.Format(time.RFC3339))
		}
		t.ExpiresAt, t.RenewedAt = &next, &now
		out = t
		return auditForToken(c.rec, t.ID), nil
	})
	if err != nil {
		return nil, asUnavailable("store", err)
	}
	return s.withUse(out), nil
}

// RevokeToken is For(nil).RevokeToken.
func (s *Service) RevokeToken(ctx context.Context, p *Principal, id string) (*Token, error) {
	return s.For(nil).RevokeToken(ctx, p, id)
}

// allKeys reports whether patterns cover every key name.
func allKeys(keys []string) bool {
	ok, _ := PatternsContain(keys, "*")
	return ok
}

// otherRootAdmins counts active admin tokens for all keys other than id.
func (s *Service) otherRootAdmins(ctx context.Context, id string, now time.Time) (int, error) {
	n, after := 0, ""
	for {
		batch, err := s.store.ListTokens(ctx, after, 500)
		if err != nil {
			return 0, asUnavailable("store", err)
		}
		for _, t := range batch {
			after = t.ID
			if t.ID != id && t.Role == RoleAdmin && t.Active(now) && allKeys(t.Keys) {
				n++
			}
		}
		if len(batch) < 500 {
			return n, nil
		}
	}
}

// FlushTokenUse writes down when tokens were last used (one transaction).
// On failure the uses are kept for the next call.
func (s *Service) FlushTokenUse(ctx context.Context) error {
	m := s.uses.take()
	if len(m) == 0 {
		return nil
	}
	if err := s.store.RecordTokenUse(ctx, m); err != nil {
		for id, t := range m {
			s.uses.note(id, t)
		}
		return asUnavailable("store", err)
	}
	return nil
}
