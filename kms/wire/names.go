package wire

import (
	"path"
	"regexp"
	"strings"
)

var nameRE = regexp.MustCompile(`^[a-z0-9][a-z0-9._-]{0,63}$`)

// ValidateName checks a key name supplied from outside.
func ValidateName(name string) error {
	if !nameRE.MatchString(name) {
		// Not echoed: a mistyped or pasted secret must not come back.
		return Errorf(KindInvalid, "invalid key name (not shown): want 1-64 characters of a-z, 0-9, '.', '_', '-', starting with a letter or digit")
	}
	return nil
}

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
	// RoleEncryptor may read keys and vouch for its own encryptions (HE
	// inputs) so that they may be decrypted.
	RoleEncryptor Role = "encryptor"
	// RoleEvaluator is a worker that also vouches for the results of its
	// evaluations on attested inputs: the identity of an evaluator service
	// such as kmsd-mcp, not of its clients.
	RoleEvaluator Role = "evaluator"
)

// MaxVersionsPage bounds a page of versions.
const MaxVersionsPage = 1000

// MayUse reports whether key patterns (path.Match globs, as tokens hold
// them) cover the key name.
func MayUse(patterns []string, name string) bool {
	for _, p := range patterns {
		if ok, _ := path.Match(p, name); ok {
			return true
		}
	}
	return false
}

// WellFormedToken reports whether tok has the shape of a kmsd bearer
// token: "kms_", a 16-hex-digit id, "_", and 43 characters of unpadded
// base64url (256 bits). A server that introspects its clients' tokens
// refuses any other at once, without asking kmsd.
func WellFormedToken(tok string) bool {
	rest, ok := strings.CutPrefix(tok, "kms_")
	if !ok || len(rest) != 16+1+43 || rest[16] != '_' {
		return false
	}
	for i, c := range rest {
		switch {
		case i < 16:
			if !('0' <= c && c <= '9' || 'a' <= c && c <= 'f') {
				return false
			}
		case i == 16:
		default:
			if !('0' <= c && c <= '9' || 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || c == '-' || c == '_') {
				return false
			}
		}
	}
	return true
}
