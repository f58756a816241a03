package kms

import (
	"context"
	"errors"
)

// CreateToken makes a bearer token with a role and key patterns. The token
// text is returned once and stored only as a hash.
func (s *Service) CreateToken(ctx context.Context, name string, role Role, keys []string) (string, *Token, error) {
	if len(name) > 128 {
		return "", nil, Errorf(KindInvalid, "token name must be at most 128 characters")
	}
	if err := ValidateRole(role); err != nil {
		return "", nil, err
	}
	if err := ValidatePatterns(keys); err != nil {
		return "", nil, err
	}
	id, tok, hash, err := newTokenSecret(s.rand)
	if err != nil {
		return "", nil, Wrap(KindInternal, "token", err)
	}
	t := &Token{ID: id, Name: name, Role: role, Keys: keys, Hash: hash, CreatedAt: s.clock.Now()}
	if err := s.store.CreateToken(ctx, t, auditFor(ctx, "", 0)); err != nil {
		return "", nil, asUnavailable("store", err)
	}
	return tok, t, nil
}

// EnsureAdminToken creates an admin token for all keys when the store has no
// token at all (first start). persist is called with the token text before
// the token is stored, so a token is never valid unless it was written down;
// if storing fails, the next start makes a new one. It returns whether a
// token was made.
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
	t := &Token{ID: id, Name: "bootstrap admin", Role: RoleAdmin, Keys: []string{"*"}, Hash: hash, CreatedAt: s.clock.Now()}
	if err := s.store.CreateToken(ctx, t, s.systemRecord("create bootstrap admin token "+id, "", 0)); err != nil {
		return false, asUnavailable("store", err)
	}
	return true, nil
}

// Authenticate maps a presented bearer token to its principal.
func (s *Service) Authenticate(ctx context.Context, token string) (*Principal, error) {
	id, secret, ok := parseToken(token)
	if !ok {
		return nil, Errorf(KindUnauthenticated, "malformed bearer token")
	}
	t, err := s.store.GetToken(ctx, id)
	if errors.Is(err, ErrNotFound) {
		return nil, Errorf(KindUnauthenticated, "unknown bearer token")
	}
	if err != nil {
		return nil, asUnavailable("store", err)
	}
	if !t.matches(secret) {
		return nil, Errorf(KindUnauthenticated, "unknown bearer token")
	}
	return &Principal{TokenID: t.ID, Role: t.Role, Keys: t.Keys}, nil
}
