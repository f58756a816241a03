package kms

import "slices"

// Permission is what a request needs from its principal.
type Permission string

const (
	// PermReadKey: read key metadata and public keys.
	PermReadKey Permission = "read-key"
	// PermUseKey: sign, verify, decapsulate.
	PermUseKey Permission = "use-key"
	// PermManageKey: create, rotate, change policy and version states.
	PermManageKey Permission = "manage-key"
	// PermManageTokens: create tokens.
	PermManageTokens Permission = "manage-tokens"
	// PermReadAudit: read audit records, checkpoints and proofs.
	PermReadAudit Permission = "read-audit"
	// PermDecrypt: decrypt HE ciphertexts.
	PermDecrypt Permission = "decrypt"
	// PermIntrospect: ask whether a bearer token is active and what it may
	// do (an evaluator service such as kmsd-mcp checks its own clients'
	// tokens; Principal.MayIntrospect bounds what it learns).
	PermIntrospect Permission = "introspect-tokens"
	// PermAttestInput: vouch for a ciphertext as an encryption by the
	// token's holder (a data owner), so that it may be decrypted.
	PermAttestInput Permission = "attest-input"
	// PermAttestEvaluation: vouch for a ciphertext as the result of an
	// evaluation on attested inputs (an evaluator service such as
	// kmsd-mcp; kmsd does not see the evaluation, so this is trust).
	PermAttestEvaluation Permission = "attest-evaluation"
	// PermExtendKeys: have kmsd generate the Galois keys a version lacks
	// (on demand). They are public, but their generation costs kmsd CPU
	// and storage. A switching key between versions links their secrets
	// (README: Re-keying): issuing one is PermManageKey.
	PermExtendKeys Permission = "extend-keys"
)

// separated are the permissions no role that decrypts may exercise: a
// token that could both vouch for a ciphertext and decrypt it would be a
// decryption oracle for chosen ciphertexts. An admin may still grant them
// (create encryptor and evaluator tokens).
var separated = map[Permission]bool{PermAttestInput: true, PermAttestEvaluation: true}

var rolePerms = map[Role][]Permission{
	RoleAdmin:     {PermReadKey, PermUseKey, PermManageKey, PermManageTokens, PermReadAudit, PermDecrypt, PermIntrospect, PermAttestInput, PermAttestEvaluation, PermExtendKeys},
	RoleDecryptor: {PermReadKey, PermDecrypt},
	RoleWorker:    {PermReadKey, PermExtendKeys},
	RoleEvaluator: {PermReadKey, PermIntrospect, PermAttestEvaluation, PermExtendKeys},
	RoleEncryptor: {PermReadKey, PermAttestInput},
	RoleAuditor:   {PermReadAudit},
}

// Authorize decides whether p may exercise perm; key is the key name the
// request touches, or "" for requests that touch no one key (listing,
// tokens). Key listing is filtered by MayUse separately.
func (p *Principal) Authorize(perm Permission, key string) error {
	if p == nil {
		return Errorf(KindUnauthenticated, "a bearer token is required")
	}
	allowed := false
	for _, q := range rolePerms[p.Role] {
		if q == perm {
			allowed = true
			break
		}
	}
	if allowed && separated[perm] && slices.Contains(rolePerms[p.Role], PermDecrypt) {
		return Errorf(KindPermissionDenied, "role %s decrypts, so it may not %s (separation of duties: a token that vouches for ciphertexts never decrypts them; use an encryptor or evaluator token)", p.Role, perm)
	}
	if !allowed {
		return Errorf(KindPermissionDenied, "role %s may not %s", p.Role, perm)
	}
	if key != "" && !p.MayUse(key) {
		return Errorf(KindPermissionDenied, "this token may not use key %q", key)
	}
	return nil
}

// AuthorizeAll decides whether p may act on the whole service at once (a
// backup holds every key and token): only an admin token whose patterns
// include "*".
func (p *Principal) AuthorizeAll(what string) error {
	if p == nil {
		return Errorf(KindUnauthenticated, "a bearer token is required")
	}
	if p.Role != RoleAdmin || !slices.Contains(p.Keys, "*") {
		return Errorf(KindPermissionDenied, "only an admin token over all keys (pattern \"*\") may %s", what)
	}
	return nil
}
