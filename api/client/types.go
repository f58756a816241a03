package client

import (
	"bytes"
	"encoding/json"
	"time"

	"github.com/kmsd-project/kmsd/kms/wire"
)

// The wire types of the REST API, shared by the server and this client.

// Policy is a key's policy. Params, Rotations, Conjugation and
// Relinearization apply to the HE kinds (ckks, bgv) only.
type Policy struct {
	DestroyWaitDays   int             `json:"destroy_wait_days,omitempty"`
	AllowedOperations []string        `json:"allowed_operations,omitempty"`
	Params            json.RawMessage `json:"params,omitempty"` // preset name (JSON string) or Lattigo parameters literal
	Rotations         []int           `json:"rotations,omitempty"`
	Conjugation       bool            `json:"conjugation,omitempty"`
	Relinearization   bool            `json:"relinearization,omitempty"`
	// DecryptLogPrecision (ckks) and DecryptBudget (decryptions per version).
	DecryptLogPrecision int    `json:"decrypt_log_precision,omitempty"`
	DecryptBudget       uint64 `json:"decrypt_budget,omitempty"`
	// OnDemandGaloisKeys: Galois keys a version may gain on demand beyond
	// its rotations (0: 64; -1: none).
	OnDemandGaloisKeys int `json:"on_demand_galois_keys,omitempty"`
	// Threshold makes the key a threshold key (set at creation).
	Threshold *ThresholdPolicy `json:"threshold,omitempty"`
	// RotationPeriod (a Go duration, "720h") has the server rotate the key
	// once its latest version is this old; empty: only on request.
	RotationPeriod string `json:"rotation_period,omitempty"`
}

// Envelope is an HE ciphertext as it crosses a process boundary: the key,
// version and parameters it is under, level, scale, slots in use and the
// Lattigo ciphertext (base64 in JSON). hekeys makes and opens them.
type Envelope = wire.Envelope

// Version is one key version.
type Version struct {
	Name        string     `json:"name"`
	Version     uint64     `json:"version"`
	State       string     `json:"state"`
	Primary     bool       `json:"primary"`
	CreatedAt   time.Time  `json:"created_at"`
	DestroyAt   *time.Time `json:"destroy_at,omitempty"`
	DestroyedAt *time.Time `json:"destroyed_at,omitempty"`
}

// Key is a key's header and, from GET /v1/keys/{name} and key creation,
// its newest versions (newest first). NextVersionsPageToken, when set,
// continues the versions at GET /v1/keys/{name}/versions. Lists and
// updates carry no versions.
type Key struct {
	Name                 string    `json:"name"`
	Kind                 string    `json:"kind"`
	Policy               Policy    `json:"policy"`
	CreatedAt            time.Time `json:"created_at"`
	PrimaryVersion       uint64    `json:"primary_version"`
	LatestVersion        uint64    `json:"latest_version"`
	MinDecryptionVersion uint64    `json:"min_decryption_version"`
	// NextRotationTime is when the server rotates the key (its latest
	// version's creation plus the policy's rotation_period); nil without
	// a period. A time in the past: due, rotated at the next check.
	NextRotationTime      *time.Time `json:"next_rotation_time,omitempty"`
	Versions              []Version  `json:"versions,omitempty"`
	NextVersionsPageToken string     `json:"next_versions_page_token,omitempty"`
}

// VersionList is a page of a key's versions, newest first.
type VersionList struct {
	Versions      []Version `json:"versions"`
	NextPageToken string    `json:"next_page_token,omitempty"`
}

// KeyList is a page of keys.
type KeyList struct {
	Keys          []Key  `json:"keys"`
	NextPageToken string `json:"next_page_token,omitempty"`
}

// CreateKeyRequest is the body of POST /v1/keys.
type CreateKeyRequest struct {
	Name   string  `json:"name"`
	Kind   string  `json:"kind"`
	Policy *Policy `json:"policy,omitempty"`
}

// UpdateKeyRequest is the body of PATCH /v1/keys/{name}. The policy is a
// JSON merge patch (RFC 7396): the fields set in Policy change, the fields
// named in ClearPolicy go back to their defaults (sent as null), and all
// others stay as they are.
type UpdateKeyRequest struct {
	Policy               *Policy  `json:"policy,omitempty"`
	ClearPolicy          []string `json:"-"` // JSON names, e.g. "decrypt_budget"
	MinDecryptionVersion *uint64  `json:"min_decryption_version,omitempty"`
}

// MarshalJSON writes the policy patch with a null for each cleared field.
func (u UpdateKeyRequest) MarshalJSON() ([]byte, error) {
	out := map[string]any{}
	if u.MinDecryptionVersion != nil {
		out["min_decryption_version"] = *u.MinDecryptionVersion
	}
	if u.Policy != nil || len(u.ClearPolicy) > 0 {
		patch := map[string]any{}
		if u.Policy != nil {
			b, err := json.Marshal(u.Policy)
			if err != nil {
				return nil, err
			}
			dec := json.NewDecoder(bytes.NewReader(b))
			dec.UseNumber() // moduli above 2^53 keep every digit
			if err := dec.Decode(&patch); err != nil {
				return nil, err
			}
		}
		for _, f := range u.ClearPolicy {
			patch[f] = nil
		}
		out["policy"] = patch
	}
	return json.Marshal(out)
}

// ScheduleDestroyRequest is the body of .../schedule-destroy.
type ScheduleDestroyRequest struct {
	Days int `json:"days,omitempty"`
}

// PublicKey is a version's public key: inline for ML-KEM/ML-DSA, as a blob
// (digest, size, URL) for the HE kinds.
type PublicKey struct {
	Name      string `json:"name"`
	Version   uint64 `json:"version"`
	Kind      string `json:"kind"`
	PublicKey []byte `json:"public_key,omitempty"` // standard base64 on the wire
	Digest    string `json:"digest,omitempty"`
	Size      int64  `json:"size,omitempty"`
	URL       string `json:"url,omitempty"`
}

// ManifestSignature is the identity key's signature over a manifest's exact
// bytes.
type ManifestSignature struct {
	Algorithm       string `json:"algorithm"`
	IdentityVersion uint64 `json:"identity_version"`
	Context         string `json:"context"`
	Signature       []byte `json:"signature"`
}

// SignRequest is the body of POST /v1/keys/{name}/sign.
type SignRequest struct {
	Message []byte `json:"message"`
	Context []byte `json:"context,omitempty"`
}

// SignResponse is a signature and the version that made it.
type SignResponse struct {
	Signature []byte `json:"signature"`
	Version   uint64 `json:"version"`
}

// VerifyRequest is the body of POST /v1/keys/{name}/verify.
type VerifyRequest struct {
	Message   []byte `json:"message"`
	Signature []byte `json:"signature"`
	Version   uint64 `json:"version"`
	Context   []byte `json:"context,omitempty"`
}

// VerifyResponse says whether a signature is valid.
type VerifyResponse struct {
	Valid bool `json:"valid"`
}

// DecapsulateRequest is the body of POST /v1/keys/{name}/decapsulate.
type DecapsulateRequest struct {
	Ciphertext []byte `json:"ciphertext"`
	Version    uint64 `json:"version"`
}

// DecapsulateResponse is a shared secret.
type DecapsulateResponse struct {
	SharedSecret []byte `json:"shared_secret"`
	Version      uint64 `json:"version"`
}

// Identity is the service's identity public key.
type Identity struct {
	Algorithm string `json:"algorithm"`
	Version   uint64 `json:"version"`
	PublicKey []byte `json:"public_key"`
}

// CreateTokenRequest is the body of POST /v1/tokens.
type CreateTokenRequest struct {
	Name string   `json:"name,omitempty"`
	Role string   `json:"role"`
	Keys []string `json:"keys"`
	// TTL is the token's lifetime as a Go duration ("24h", "90m");
	// empty: the server's maximum (--max-token-ttl).
	TTL string `json:"ttl,omitempty"`
	// MaxLifetime (with TTL) makes the token renewable (POST
	// /v1/tokens/self/renew): each renewal extends it by TTL, never past
	// creation + MaxLifetime (at most --max-token-ttl).
	MaxLifetime string `json:"max_lifetime,omitempty"`
	// Audience binds the token to these resources (RFC 8707), such as an
	// MCP server's canonical URL: it works only there, never at kmsd.
	Audience []string `json:"audience,omitempty"`
}

// TokenInfo is a token's metadata; it never holds the secret.
type TokenInfo struct {
	ID         string     `json:"id"`
	Name       string     `json:"name,omitempty"`
	Role       string     `json:"role"`
	Keys       []string   `json:"keys"`
	CreatedAt  time.Time  `json:"created_at"`
	CreatedBy  string     `json:"created_by,omitempty"`
	ExpiresAt  *time.Time `json:"expires_at,omitempty"`
	LastUsedAt *time.Time `json:"last_used_at,omitempty"`
	RevokedAt  *time.Time `json:"revoked_at,omitempty"`
	// A renewable token's ttl, the latest expiry renewals reach, and its
	// last renewal.
	TTL          string     `json:"ttl,omitempty"`
	MaxExpiresAt *time.Time `json:"max_expires_at,omitempty"`
	RenewedAt    *time.Time `json:"renewed_at,omitempty"`
	// Audience: the resources the token is bound to (none: kmsd's API).
	Audience []string `json:"audience,omitempty"`
}

// IntrospectRequest is the body of POST /v1/tokens/introspect.
type IntrospectRequest struct {
	Token string `json:"token"`
}

// Introspection is a token's state in the shape of RFC 7662: for an
// inactive token (unknown, wrong secret, revoked, expired, malformed) only
// Active=false.
type Introspection struct {
	Active    bool     `json:"active"`
	TokenType string   `json:"token_type,omitempty"` // "Bearer"
	TokenID   string   `json:"token_id,omitempty"`
	Role      string   `json:"role,omitempty"`
	Keys      []string `json:"keys,omitempty"` // key-name patterns
	Exp       int64    `json:"exp,omitempty"`  // expiry, seconds since 1970; absent: never
	Aud       []string `json:"aud,omitempty"`  // the resources an audience-bound token is for
	// ClientID is, for an access token obtained by the client
	// credentials grant, its client's token id (RFC 7662 client_id).
	ClientID string `json:"client_id,omitempty"`
	// Scope is the token's scope as the token endpoint would state it:
	// its role, then key:<pattern> for each of its patterns.
	Scope string `json:"scope,omitempty"`
}

// AuthServerMetadata is kmsd's OAuth authorization server metadata
// (RFC 8414), at /.well-known/oauth-authorization-server.
type AuthServerMetadata struct {
	Issuer                            string   `json:"issuer"`
	TokenEndpoint                     string   `json:"token_endpoint"`
	AuthorizationEndpoint             string   `json:"authorization_endpoint"`
	GrantTypesSupported               []string `json:"grant_types_supported"`
	TokenEndpointAuthMethodsSupported []string `json:"token_endpoint_auth_methods_supported"`
	ScopesSupported                   []string `json:"scopes_supported"`
	ResponseTypesSupported            []string `json:"response_types_supported"`
	CodeChallengeMethodsSupported     []string `json:"code_challenge_methods_supported"`
	IntrospectionEndpoint             string   `json:"introspection_endpoint"`
	ServiceDocumentation              string   `json:"service_documentation,omitempty"`
}

// AccessToken is the token endpoint's answer (RFC 6749 5.1).
type AccessToken struct {
	AccessToken string `json:"access_token"`
	TokenType   string `json:"token_type"`
	ExpiresIn   int64  `json:"expires_in"`
	Scope       string `json:"scope"`
}

// OAuthError is the token endpoint's refusal (RFC 6749 5.2), with the
// problem fields kmsd's other answers carry.
type OAuthError struct {
	Error       string `json:"error"`
	Description string `json:"error_description"`
	Problem
}

// Token is a created token. Token (the secret) is returned only once.
type Token struct {
	TokenInfo
	Token string `json:"token"`
}

// TokenList is one page of GET /v1/tokens.
type TokenList struct {
	Tokens        []TokenInfo `json:"tokens"`
	NextPageToken string      `json:"next_page_token,omitempty"`
}

// Problem is an RFC 9457 problem document.
type Problem struct {
	Type      string `json:"type"`
	Title     string `json:"title"`
	Status    int    `json:"status"`
	Detail    string `json:"detail,omitempty"`
	Instance  string `json:"instance,omitempty"`
	RequestID string `json:"request_id,omitempty"`
}

// Health is the body of /healthz and /readyz.
type Health struct {
	Status string `json:"status"`
	// BlobsFailingDigest (readyz) is how many blobs' stored bytes did not
	// match their digest when last served: kmsd refuses to serve them until
	// they do, and its log names them.
	BlobsFailingDigest int `json:"blobs_failing_digest,omitempty"`
	// AuditArchive (readyz, with --audit-archive) is where the archive
	// stands.
	AuditArchive *ArchiveStatus `json:"audit_archive,omitempty"`
}

// ArchiveStatus is where the audit archive stands.
type ArchiveStatus struct {
	// Archived is how many records the archive's checkpoint covers.
	Archived uint64 `json:"archived"`
	// Lag is how many records the store's newest checkpoint covers that
	// the archive does not hold yet.
	Lag uint64 `json:"lag"`
	// PrunedBelow: the store no longer holds the records below it
	// (retention); kmsd reads them from the archive.
	PrunedBelow uint64 `json:"pruned_below,omitempty"`
	// FailingSince is when writing the archive started failing (RFC
	// 3339), while it fails: the log says why.
	FailingSince string `json:"failing_since,omitempty"`
}

// DecryptResponse is a decryption's result: CKKS slots' real parts (rounded)
// or BGV slots.
type DecryptResponse struct {
	Values  any    `json:"values"`
	Version uint64 `json:"version"`
	// Precision is the bits of a CKKS result kept after noise flooding
	// (each value is within 2^-precision of the exact result, but for a
	// fraction of 2^-14 of slots); absent for BGV, which is exact.
	Precision int `json:"precision,omitempty"`
}

// Attestation is kmsd's signed statement of where a ciphertext comes from.
type Attestation = wire.Attestation

// Statement is what an attestation says.
type Statement = wire.Statement

// AttestRequest asks kmsd to vouch for a ciphertext: the envelope's digest
// (Envelope.Digest), level, scale and slots; op "encrypt" for an input
// (encryptor token), or an evaluation's operation with the attestations of
// its inputs, its amplification (the largest sum of absolute weights an
// output has, at least 1) and its key switches (evaluator token).
type AttestRequest struct {
	Digest        string         `json:"digest"`
	Level         int            `json:"level"`
	Scale         float64        `json:"scale"`
	Slots         int            `json:"slots"`
	Op            string         `json:"op"`
	Inputs        []*Attestation `json:"inputs,omitempty"`
	Amplification float64        `json:"amplification,omitempty"`
	KeySwitches   int            `json:"key_switches,omitempty"`
}

// AttestResponse is the attestation and, decoded, its statement.
type AttestResponse struct {
	Attestation *Attestation `json:"attestation"`
	Statement   *Statement   `json:"statement"`
}

// Operation is a long-running generation (answered 202).
type Operation struct {
	ID       string   `json:"id"`
	State    string   `json:"state"` // running, succeeded, failed
	Progress Progress `json:"progress"`
	Error    string   `json:"error,omitempty"`
	Key      string   `json:"key"`
	Version  uint64   `json:"version,omitempty"`
}

// Progress counts keys generated of the total and bytes written.
type Progress struct {
	Done  int   `json:"done"`
	Total int   `json:"total"`
	Bytes int64 `json:"bytes"`
}

// KEKStatus is GET /v1/kek: the KEK that seals (primary), the others
// that still open, and the last rotation.
type KEKStatus struct {
	Primary  string       `json:"primary"`
	Others   []string     `json:"others"`
	Rotation *KEKRotation `json:"rotation,omitempty"`
	// With ?count=true: secrets sealed under each KEK, and the KEK the
	// store's record key is sealed under.
	SealedUnder  map[string]int `json:"sealed_under,omitempty"`
	RecordKeyKEK string         `json:"record_key_kek,omitempty"`
}

// KEKRotation is where a KEK rotation stands.
type KEKRotation struct {
	Seq        int        `json:"seq"`   // rotations of this store, counted from 1
	State      string     `json:"state"` // creating, rewrapping, done
	From       []string   `json:"from"`
	To         string     `json:"to"`
	StartedAt  time.Time  `json:"started_at"`
	FinishedAt *time.Time `json:"finished_at,omitempty"`
	By         string     `json:"by,omitempty"`     // the token that started it
	Cursor     string     `json:"cursor,omitempty"` // the last key done in this pass
	Keys       int        `json:"keys"`             // keys looked at
	Versions   int        `json:"versions"`         // sealed versions looked at
	Rewrapped  int        `json:"rewrapped"`        // of those, sealed again under the new KEK
	Passes     int        `json:"passes"`
	// SealedUnder counts, once done, the secrets under each KEK.
	SealedUnder map[string]int `json:"sealed_under,omitempty"`
	Error       string         `json:"error,omitempty"` // the last error (the rewrap retries)
}

// GaloisKeysRequest is the body of POST
// /v1/keys/{name}/versions/{version}/evaluation-keys: the slot rotations
// (to the left; negative to the right) and the conjugation (CKKS; BGV's
// row swap) whose Galois keys the caller needs.
type GaloisKeysRequest struct {
	Rotations   []int `json:"rotations,omitempty"`
	Conjugation bool  `json:"conjugation,omitempty"`
}

// GaloisKeysResult lists the asked Galois keys (by element). The
// signed manifest or extension lists each of them: a client trusts those,
// not this answer.
type GaloisKeysResult struct {
	Key        string      `json:"key"`
	Version    uint64      `json:"version"`
	GaloisKeys []GaloisRef `json:"galois_keys"`
	// Generated is how many keys this request made (0: all were there).
	Generated int `json:"generated"`
	// ExtensionSequence is the extension listing the keys the manifest
	// does not (0: the manifest lists them all).
	ExtensionSequence uint64 `json:"extension_sequence"`
}

// SwitchingKeyRequest is the body of POST
// /v1/keys/{name}/versions/{version}/switching-keys.
type SwitchingKeyRequest struct {
	ToVersion uint64 `json:"to_version"`
}

// SwitchingKeyResult names the switching key from the path's version to
// ToVersion; the version's signed extension lists it.
type SwitchingKeyResult struct {
	Key               string       `json:"key"`
	Version           uint64       `json:"version"`
	SwitchingKey      SwitchingRef `json:"switching_key"`
	Generated         int          `json:"generated"`
	ExtensionSequence uint64       `json:"extension_sequence"`
}

// SignedExtension is a manifest extension's exact bytes and signature
// (GET .../evaluation-keys/extension).
type SignedExtension = wire.SignedExtension

// SwitchingRef names a switching key's blob.
type SwitchingRef = wire.SwitchingRef

// GaloisRef names a Galois key's blob.
type GaloisRef = wire.GaloisRef

// ThresholdPolicy makes an HE key a threshold key: the kmsd nodes (peer
// names) that hold its secret's shares, and how many decrypt together.
type ThresholdPolicy struct {
	Parties []string `json:"parties"`
	T       int      `json:"t"`
	// Requesters: ML-DSA-65 public keys (base64); when set, every party
	// decrypts only requests one of them signed.
	Requesters []string `json:"requesters,omitempty"`
}

// ThresholdDecryptRequest is the body of POST
// /v1/keys/{name}/versions/{version}/threshold-decrypt: an attested
// envelope and the requester's ephemeral public key (he/threshold's
// EncodeTarget), which the parties' answers are encrypted to.
type ThresholdDecryptRequest struct {
	Ciphertext *Envelope           `json:"ciphertext"`
	PublicKey  []byte              `json:"public_key"`
	Requester  *RequesterSignature `json:"requester,omitempty"`
}

// RequesterSignature is a requester's signature on a threshold
// decryption request (wire.ThresholdRequestMessage).
type RequesterSignature = wire.RequesterSignature

// ThresholdDecryptResult are the parties' partial decryptions, for the
// requester to combine and decrypt with its ephemeral secret key.
type ThresholdDecryptResult struct {
	Key       string   `json:"key"`
	Version   uint64   `json:"version"`
	Parties   []string `json:"parties"`
	Active    []int    `json:"active"`
	Partials  [][]byte `json:"partials"`
	Precision int      `json:"precision,omitempty"`
}
