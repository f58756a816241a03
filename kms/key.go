package kms

import (
	"encoding/binary"
	"encoding/json"
	"slices"
	"strings"
	"time"
)

// State is the state of one key version.
type State string

const (
	StateEnabled          State = "enabled"
	StateDisabled         State = "disabled"
	StateDestroyScheduled State = "destroy_scheduled"
	StateDestroyed        State = "destroyed"
)

// Operation names what a key may be used for; a kind offers a fixed set and a
// key's policy may narrow it.
type Operation string

const (
	OpSign        Operation = "sign"
	OpVerify      Operation = "verify"
	OpDecapsulate Operation = "decapsulate"
	OpDecrypt     Operation = "decrypt"
)

// Destroy waiting period bounds, in days.
const (
	DefaultDestroyWaitDays = 30
	MinDestroyWaitDays     = 1
	MaxDestroyWaitDays     = 365
)

// Policy is what an administrator sets on a key.
type Policy struct {
	// DestroyWaitDays is the waiting period of schedule-destroy when the
	// request names none.
	DestroyWaitDays int `json:"destroy_wait_days"`
	// AllowedOperations narrows the operations of the key's kind. Empty
	// means all of them.
	AllowedOperations []Operation `json:"allowed_operations,omitempty"`

	// Homomorphic-encryption kinds only: the parameter set (a preset name
	// or a Lattigo parameters literal) and the evaluation keys each version
	// gets. Changes apply to versions made afterwards.
	Params          json.RawMessage `json:"params,omitempty"`
	Rotations       []int           `json:"rotations,omitempty"`
	Conjugation     bool            `json:"conjugation,omitempty"`
	Relinearization bool            `json:"relinearization,omitempty"`
	// DecryptLogPrecision: CKKS results are rounded to this many bits of
	// precision (Lattigo's DecodePublic) so decryption results do not leak
	// the secret key (default 16). DecryptBudget: decryptions per version,
	// 0 for no limit; past it the key must be rotated.
	DecryptLogPrecision int    `json:"decrypt_log_precision,omitempty"`
	DecryptBudget       uint64 `json:"decrypt_budget,omitempty"`
	// OnDemandGaloisKeys is how many Galois keys beyond its rotations a
	// version may gain on demand (POST .../evaluation-keys): 0 means
	// DefaultOnDemandGaloisKeys, -1 none; at most MaxOnDemandGaloisKeys.
	OnDemandGaloisKeys int `json:"on_demand_galois_keys,omitempty"`
	// Threshold makes the key a threshold key (its secret only as shares
	// held by kmsd nodes; t of them decrypt together). Set at creation.
	Threshold *ThresholdPolicy `json:"threshold,omitempty"`

	// RotationPeriod, when set, has the service rotate the key once its
	// latest version is this old (scheduled rotation, RunRotation); zero:
	// only on request. Between Config.MinRotationPeriod and
	// MaxRotationPeriod.
	RotationPeriod time.Duration `json:"rotation_period,omitempty"`
}

// hasKeysetFields reports whether any HE field is set.
func (p Policy) hasKeysetFields() bool {
	return len(p.Params) > 0 || len(p.Rotations) > 0 || p.Conjugation || p.Relinearization || p.DecryptLogPrecision != 0 || p.DecryptBudget != 0 || p.OnDemandGaloisKeys != 0 || p.Threshold != nil
}

// Version is one generation of key material.
type Version struct {
	Number      uint64     `json:"number"`
	State       State      `json:"state"`
	CreatedAt   time.Time  `json:"created_at"`
	DestroyAt   *time.Time `json:"destroy_at,omitempty"`
	DestroyedAt *time.Time `json:"destroyed_at,omitempty"`
	PublicKey   []byte     `json:"public_key,omitempty"`
	// Sealed is the secret material sealed by the Sealer; nil once destroyed.
	Sealed []byte `json:"sealed,omitempty"`

	// HE versions: the manifest, its signature by the identity key (and
	// that key's version), and the blobs it lists.
	Manifest      []byte   `json:"manifest,omitempty"`
	ManifestSig   []byte   `json:"manifest_sig,omitempty"`
	ManifestSigBy uint64   `json:"manifest_sig_by,omitempty"`
	Blobs         []string `json:"blobs,omitempty"`
	// Extension is the signed list of the evaluation keys made for the
	// version after its manifest (wire.ManifestExtension: Galois keys on
	// demand, switching keys to later versions), ExtensionSig its
	// signature by identity version ExtensionSigBy; nil when none. Its
	// blobs are in Blobs too.
	Extension      []byte `json:"extension,omitempty"`
	ExtensionSig   []byte `json:"extension_sig,omitempty"`
	ExtensionSigBy uint64 `json:"extension_sig_by,omitempty"`
	// Decryptions counts decryptions with this version (HE budget).
	Decryptions uint64 `json:"decryptions,omitempty"`
}

// Key is a key's header: what every request reads besides the one version
// it uses. Versions are records of their own (Store.GetVersion), numbered
// from 1 to Latest with no gaps, so a request's cost does not grow with the
// key's history.
type Key struct {
	Name                 string    `json:"name"`
	Kind                 string    `json:"kind"`
	Policy               Policy    `json:"policy"`
	CreatedAt            time.Time `json:"created_at"`
	Primary              uint64    `json:"primary"`
	Latest               uint64    `json:"latest"`
	MinDecryptionVersion uint64    `json:"min_decryption_version"`
	// LatestCreatedAt is when version Latest was made, so that the
	// rotation schedule is read from headers alone. Zero in headers
	// written before it existed: set when a rotation_period is given.
	LatestCreatedAt time.Time `json:"latest_created_at,omitzero"`
}

// NextRotation is when the key's scheduled rotation is due: the latest
// version's creation plus the policy's rotation period; false when the
// policy sets no period.
func (k *Key) NextRotation() (time.Time, bool) {
	if k.Policy.RotationPeriod <= 0 {
		return time.Time{}, false
	}
	return k.latestMade().Add(k.Policy.RotationPeriod), true
}

// latestMade is when the latest version was made, as far as the header
// knows.
func (k *Key) latestMade() time.Time {
	if k.LatestCreatedAt.IsZero() {
		return k.CreatedAt
	}
	return k.LatestCreatedAt
}

// RotationClockSlack is how far after now a key's latest version may be
// dated (replicas' clocks a little apart) before the scheduler takes the
// date for a clock error.
const RotationClockSlack = time.Minute

// RotationDue reports whether the key's scheduled rotation is due at now:
// its next rotation time has come, or (ahead) its latest version is dated
// more than RotationClockSlack after now. Such a version was made while
// the clock ran ahead (an NTP step, a VM resumed with a wrong clock) and
// the clock was put right since: waiting for its next rotation time would
// postpone the rotation by the clock's error, so it is due now.
func (k *Key) RotationDue(now time.Time) (due, ahead bool) {
	next, ok := k.NextRotation()
	switch {
	case !ok:
		return false, false
	case !next.After(now):
		return true, false
	case k.latestMade().After(now.Add(RotationClockSlack)):
		return true, true
	}
	return false, false
}

// Clone returns a deep copy.
func (k *Key) Clone() *Key {
	c := *k
	c.Policy.AllowedOperations = slices.Clone(k.Policy.AllowedOperations)
	c.Policy.Params = slices.Clone(k.Policy.Params)
	c.Policy.Rotations = slices.Clone(k.Policy.Rotations)
	if t := k.Policy.Threshold; t != nil {
		c.Policy.Threshold = &ThresholdPolicy{Parties: slices.Clone(t.Parties), T: t.T, Requesters: slices.Clone(t.Requesters)}
	}
	return &c
}

// HasVersion reports whether version n exists.
func (k *Key) HasVersion(n uint64) bool { return n >= 1 && n <= k.Latest }

// Clone returns a deep copy.
func (v *Version) Clone() *Version {
	c := *v
	c.PublicKey = slices.Clone(v.PublicKey)
	c.Sealed = slices.Clone(v.Sealed)
	c.Manifest = slices.Clone(v.Manifest)
	c.ManifestSig = slices.Clone(v.ManifestSig)
	c.Extension = slices.Clone(v.Extension)
	c.ExtensionSig = slices.Clone(v.ExtensionSig)
	c.Blobs = slices.Clone(v.Blobs)
	if v.DestroyAt != nil {
		t := *v.DestroyAt
		c.DestroyAt = &t
	}
	if v.DestroyedAt != nil {
		t := *v.DestroyedAt
		c.DestroyedAt = &t
	}
	return &c
}

// Allows reports whether the policy lets the key be used for op.
func (p Policy) Allows(op Operation) bool {
	return len(p.AllowedOperations) == 0 || slices.Contains(p.AllowedOperations, op)
}

// clip shortens s for an error message so a huge input is not echoed.
func clip(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "..."
}

// SealContext names the material a sealed blob holds. Its AAD binds a blob to
// exactly one key, version and kind under one KEK.
type SealContext struct {
	Key     string
	Version uint64
	Kind    string
}

// AAD is the additional authenticated data for a blob sealed under kekID.
// Each field is length-prefixed so no two contexts encode alike.
func (c SealContext) AAD(kekID string) []byte {
	var b []byte
	b = append(b, "kmsd-seal-v1"...)
	for _, s := range []string{c.Key, c.Kind, kekID} {
		b = binary.BigEndian.AppendUint32(b, uint32(len(s)))
		b = append(b, s...)
	}
	b = binary.BigEndian.AppendUint64(b, c.Version)
	return b
}

// internalPrefix marks names the service keeps for itself (the identity key).
// ValidateName refuses it, so no client can name, read or change such a key.
const internalPrefix = "_"

// IsInternal reports whether name is a service-internal key.
func IsInternal(name string) bool { return strings.HasPrefix(name, internalPrefix) }
