package kms

import (
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"encoding/hex"
	"io"
	"path"
	"slices"
	"strings"
	"time"
)

// Token is a bearer token as stored: its secret is kept only as a hash.
type Token struct {
	ID        string    `json:"id"`
	Name      string    `json:"name"`
	Role      Role      `json:"role"`
	Keys      []string  `json:"keys"` // key-name patterns (path.Match syntax)
	Hash      []byte    `json:"hash"` // SHA-256 of the secret part
	CreatedAt time.Time `json:"created_at"`
	// CreatedBy is the id of the token that created this one, or "system"
	// for the bootstrap admin token.
	CreatedBy string `json:"created_by,omitempty"`
	// ExpiresAt is when the token stops working; nil: never.
	ExpiresAt *time.Time `json:"expires_at,omitempty"`
	// RevokedAt is when the token was revoked; nil: not revoked.
	RevokedAt *time.Time `json:"revoked_at,omitempty"`
	// TTL is the lifetime a renewal gives (nanoseconds), and
	// MaxExpiresAt the latest expiry renewals may reach (max_lifetime at
	// creation): a token without it does not renew.
	TTL          time.Duration `json:"ttl,omitempty"`
	MaxExpiresAt *time.Time    `json:"max_expires_at,omitempty"`
	// RenewedAt is when the token was last renewed; nil: never.
	RenewedAt *time.Time `json:"renewed_at,omitempty"`
	// Audience, if set, binds the token to these resources (RFC 8707
	// resource URIs: an MCP server's canonical URL): it works there, whose
	// server introspects it, and nowhere at kmsd itself.
	Audience []string `json:"audience,omitempty"`
	// Client is, for an OAuth access token (made by the client
	// credentials grant), the id of the client token that obtained it:
	// it works only while that token is active, and is never a client
	// itself.
	Client string `json:"client,omitempty"`
	// LastUsedAt is the last time the token authenticated a request, as
	// last written down (the service keeps newer uses in memory and
	// writes them about once a minute).
	LastUsedAt *time.Time `json:"last_used_at,omitempty"`
}

// Expired reports whether the token has expired at now.
func (t *Token) Expired(now time.Time) bool {
	return t.ExpiresAt != nil && !now.Before(*t.ExpiresAt)
}

// Active reports whether the token authenticates at now.
func (t *Token) Active(now time.Time) bool { return t.RevokedAt == nil && !t.Expired(now) }

const tokenPrefix = "kms_"

// newTokenSecret makes a token "kms_<id>_<secret>" from rand: a 16-hex-digit
// id to look the record up by, and 256 random bits.
func newTokenSecret(rand io.Reader) (id, token string, hash []byte, err error) {
	buf := make([]byte, 8+32)
	if _, err := io.ReadFull(rand, buf); err != nil {
		return "", "", nil, err
	}
	id = hex.EncodeToString(buf[:8])
	secret := base64.RawURLEncoding.EncodeToString(buf[8:])
	h := sha256.Sum256([]byte(secret))
	return id, tokenPrefix + id + "_" + secret, h[:], nil
}

// parseToken splits a presented token into id and secret.
func parseToken(tok string) (id, secret string, ok bool) {
	rest, ok := strings.CutPrefix(tok, tokenPrefix)
	if !ok {
		return "", "", false
	}
	id, secret, ok = strings.Cut(rest, "_")
	if !ok || len(id) != 16 || secret == "" {
		return "", "", false
	}
	return id, secret, true
}

// matches reports whether the presented secret hashes to the stored hash, in
// constant time.
func (t *Token) matches(secret string) bool {
	h := sha256.Sum256([]byte(secret))
	return subtle.ConstantTimeCompare(h[:], t.Hash) == 1
}

// MayUse reports whether the token's key patterns cover the key name.
func (t *Token) MayUse(name string) bool {
	for _, p := range t.Keys {
		if ok, _ := path.Match(p, name); ok {
			return true
		}
	}
	return false
}

// Principal is an authenticated caller.
type Principal struct {
	TokenID   string
	Role      Role
	Keys      []string
	ExpiresAt *time.Time // nil: the token does not expire
	Audience  []string   // the resources an audience-bound token is for
	Client    string     // an OAuth access token's client token id
}

// covers reports whether a token of role, patterns keys and expiry exp is
// within what p holds: a role whose permissions p's role has, patterns
// whose names p's patterns all match, and an expiry no later than p's. If
// not, it says why, for the client.
func (p *Principal) covers(role Role, keys []string, exp *time.Time) error {
	for _, perm := range rolePerms[role] {
		if !slices.Contains(rolePerms[p.Role], perm) {
			return Errorf(KindPermissionDenied, "a %s token may not create or manage %s tokens (role %s may %s)", p.Role, role, role, perm)
		}
	}
	for _, k := range keys {
		if ok, example := PatternsContain(p.Keys, k); !ok {
			if example != "" {
				return Errorf(KindPermissionDenied, "key pattern %q reaches beyond this token's patterns (it matches %q)", clip(k, 40), clip(example, 70))
			}
			return Errorf(KindPermissionDenied, "key pattern %q could not be shown to be within this token's patterns", clip(k, 40))
		}
	}
	if p.ExpiresAt != nil && (exp == nil || exp.After(*p.ExpiresAt)) {
		return Errorf(KindPermissionDenied, "the token would outlive this token, which expires at %s", p.ExpiresAt.UTC().Format(time.RFC3339))
	}
	return nil
}

// MayIntrospect reports whether the principal may learn what token t
// may do: a caller itself; an admin the tokens within its own scope (it
// could make them); another caller (an evaluator service such as
// kmsd-mcp) only the tokens of the parties it serves, workers and
// encryptors, whose key patterns lie within its own.
// Beyond that the answer is active=false: an evaluator cannot probe an
// admin's token.
func (p *Principal) MayIntrospect(t *Principal) bool {
	if t.TokenID == p.TokenID {
		return true // a token asking about itself
	}
	if p.Role == RoleAdmin {
		return p.covers(t.Role, t.Keys, t.ExpiresAt) == nil // the tokens it could make
	}
	if t.Role != RoleWorker && t.Role != RoleEncryptor {
		return false
	}
	for _, k := range t.Keys {
		if ok, _ := PatternsContain(p.Keys, k); !ok {
			return false
		}
	}
	return true
}

// MayUse reports whether the principal may touch the named key.
func (p *Principal) MayUse(name string) bool {
	t := Token{Keys: p.Keys}
	return t.MayUse(name)
}

// ValidateRole checks a role named from outside.
func ValidateRole(r Role) error {
	switch r {
	case RoleAdmin, RoleWorker, RoleEvaluator, RoleAuditor, RoleDecryptor, RoleEncryptor:
		return nil
	}
	return Errorf(KindInvalid, "unknown role: want admin, worker, evaluator, encryptor, auditor or decryptor")
}

// ValidatePatterns checks key-name patterns named from outside.
func ValidatePatterns(ps []string) error {
	if len(ps) == 0 {
		return Errorf(KindInvalid, "a token needs at least one key pattern (\"*\" for all keys)")
	}
	if len(ps) > 64 {
		return Errorf(KindInvalid, "a token takes at most 64 key patterns")
	}
	for _, p := range ps {
		if p == "" || len(p) > 128 {
			return Errorf(KindInvalid, "a key pattern must be 1-128 characters")
		}
		// Only what can match a key name: its characters and the glob's.
		// Anything else (upper case, a pasted token) matches nothing and
		// would be stored and shown back; it is refused, not echoed.
		for i := 0; i < len(p); i++ {
			if c := p[i]; !('a' <= c && c <= 'z' || '0' <= c && c <= '9' || strings.IndexByte("._-*?[]^\\", c) >= 0) {
				return Errorf(KindInvalid, "a key pattern may hold only a-z, 0-9, '.', '_', '-' and the glob characters * ? [ ] ^ \\ (not shown)")
			}
		}
		if _, err := path.Match(p, ""); err != nil {
			return Errorf(KindInvalid, "malformed key pattern (not shown)")
		}
	}
	return nil
}
