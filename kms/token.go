package kms

import (
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"encoding/hex"
	"io"
	"path"
	"strings"
	"time"
)

// Role is what a bearer token may do.
type Role string

const (
	// RoleAdmin may do everything.
	RoleAdmin Role = "admin"
	// RoleWorker may read keys and their public keys.
	RoleWorker Role = "worker"
	// RoleAuditor may read the audit log, its checkpoints and proofs.
	RoleAuditor Role = "auditor"
	// RoleDecryptor may read keys and decrypt HE ciphertexts.
	RoleDecryptor Role = "decryptor"
)

// Token is a bearer token as stored: its secret is kept only as a hash.
type Token struct {
	ID        string    `json:"id"`
	Name      string    `json:"name"`
	Role      Role      `json:"role"`
	Keys      []string  `json:"keys"` // key-name patterns (path.Match syntax)
	Hash      []byte    `json:"hash"` // SHA-256 of the secret part
	CreatedAt time.Time `json:"created_at"`
}

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
	TokenID string
	Role    Role
	Keys    []string
}

// MayUse reports whether the principal may touch the named key.
func (p *Principal) MayUse(name string) bool {
	t := Token{Keys: p.Keys}
	return t.MayUse(name)
}

// ValidateRole checks a role named from outside.
func ValidateRole(r Role) error {
	switch r {
	case RoleAdmin, RoleWorker, RoleAuditor, RoleDecryptor:
		return nil
	}
	return Errorf(KindInvalid, "unknown role %q: want admin, worker, auditor or decryptor", clip(string(r), 40))
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
			return Errorf(KindInvalid, "key pattern %q must be 1-128 characters", clip(p, 40))
		}
		if _, err := path.Match(p, ""); err != nil {
			return Errorf(KindInvalid, "malformed key pattern %q", clip(p, 40))
		}
	}
	return nil
}
