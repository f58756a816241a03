package kms

import (
	"context"
	"io"
	"time"
)

// Sealer encrypts secret material under a key that never leaves an HSM.
// Implementations must bind every blob to sc (SealContext.AAD) so that a blob
// does not open under another context.
type Sealer interface {
	Seal(ctx context.Context, sc SealContext, plaintext Secret) ([]byte, error)
	Unseal(ctx context.Context, sc SealContext, blob []byte) (Secret, error)
	// Ping checks that the HSM answers.
	Ping(ctx context.Context) error
}

// Store persists keys and tokens. Implementations commit each call durably
// (fsync) before returning nil.
//
// A key is a small header (Key) and one record per version (Version); a
// request that uses one version reads the header and that version only.
type Store interface {
	// CreateKey stores a new key's header and its version 1 and appends the
	// audit records, in one transaction; ErrAlreadyExists if the name is
	// taken.
	CreateKey(ctx context.Context, k *Key, v *Version, audit []*AuditRecord) error
	// GetKey returns a copy of the key's header; ErrNotFound if absent.
	GetKey(ctx context.Context, name string) (*Key, error)
	// GetVersion returns a copy of version n of the key; ErrNotFound if
	// the key or the version is absent.
	GetVersion(ctx context.Context, name string, n uint64) (*Version, error)
	// ListKeys returns up to limit key headers with names after `after`,
	// in name order.
	ListKeys(ctx context.Context, after string, limit int) ([]*Key, error)
	// ListVersions returns the key's header and up to limit of its
	// versions numbered below `before` (0: from the latest), newest
	// first, read in one snapshot (one transaction, one revision): no
	// version newer than the header's Latest comes with it; ErrNotFound
	// if the key is absent.
	ListVersions(ctx context.Context, name string, before uint64, limit int) (*Key, []*Version, error)
	// UpdateKey runs fn on a transaction over one key: fn changes the
	// header (tx.Key), versions it loads (tx.Version) and versions it adds
	// (tx.AddVersion); the store writes them and the audit records fn
	// returns in one transaction if fn returns no error. If fn or the
	// commit fails, nothing changes.
	UpdateKey(ctx context.Context, name string, fn func(tx KeyTx) ([]*AuditRecord, error)) error
	// DueVersions returns up to limit versions scheduled for destruction
	// at or before now, the earliest first. Stores index the DestroyAt of
	// every version in StateDestroyScheduled they write, in the same
	// transaction.
	DueVersions(ctx context.Context, now time.Time, limit int) ([]VersionRef, error)

	// CreateToken stores a token record and the audit records in one
	// transaction; ErrAlreadyExists if the id is taken.
	CreateToken(ctx context.Context, t *Token, audit []*AuditRecord) error
	// CreateFirstToken is CreateToken only while no token exists (the
	// bootstrap admin token): ErrAlreadyExists otherwise, checked in the
	// same transaction, so of replicas starting at once on an empty store
	// exactly one makes it.
	CreateFirstToken(ctx context.Context, t *Token, audit []*AuditRecord) error
	// GetToken returns the token with the id; ErrNotFound if absent.
	GetToken(ctx context.Context, id string) (*Token, error)
	// CountTokens returns how many tokens exist.
	CountTokens(ctx context.Context) (int, error)
	// ListTokens returns up to limit tokens with ids after `after`, in id
	// order.
	ListTokens(ctx context.Context, after string, limit int) ([]*Token, error)
	// UpdateToken loads the token, calls fn on a copy, and stores the copy
	// and the audit records fn returns in one transaction if fn returns no
	// error; ErrNotFound if absent.
	UpdateToken(ctx context.Context, id string, fn func(t *Token) ([]*AuditRecord, error)) error
	// DeleteTokens removes the tokens named (those that still exist) and
	// stores the audit records, in one transaction.
	DeleteTokens(ctx context.Context, ids []string, audit []*AuditRecord) error
	// RecordTokenUse sets LastUsedAt of the tokens named (those that still
	// exist) to the given times when later than what is stored, in one
	// transaction.
	RecordTokenUse(ctx context.Context, used map[string]time.Time) error

	// BlobOwner returns the name of the key whose versions list the blob;
	// ErrNotFound if none does. Stores index the Blobs of every version
	// they write, in the same transaction.
	BlobOwner(ctx context.Context, digest string) (string, error)

	// Ping checks that the store answers.
	Ping(ctx context.Context) error

	// Watch registers fn to learn of every committed change: it is called
	// with the records a transaction changed after it committed, before
	// the call that committed returns (so a cache fed by it is never stale
	// in this process once a write is acknowledged). A replicated store
	// calls it from its watch for the commits of other replicas, too.
	// fn must be fast and must not call the store.
	Watch(fn func([]Change))
}

// Freshness is a store whose change feed can lag what is committed
// (replicas: another process's commit reaches Watch's callbacks through
// etcd's watch). FreshWithin reports whether every change committed more
// than d ago has reached them, measured on the monotonic clock (a process
// paused or cut off from etcd is not fresh).
type Freshness interface {
	FreshWithin(d time.Duration) bool
}

// KeyTx is one key inside a Store.UpdateKey transaction.
type KeyTx interface {
	// Key is the header, to read and change.
	Key() *Key
	// Version loads version n to read and change; changes are written at
	// commit. A not-found error if the key has no version n.
	Version(n uint64) (*Version, error)
	// AddVersion adds version Latest+1 and advances the header's Latest.
	AddVersion(v *Version) error
}

// VersionRef names one version of one key.
type VersionRef struct {
	Key     string
	Version uint64
}

// Change names a record a committed transaction wrote: a key's header
// (Key set, Version 0), one version (Key and Version set) or a token
// (Token set). All says anything may have changed (a replicated store that
// lost its watch): drop every record.
type Change struct {
	Key     string
	Version uint64
	Token   string
	All     bool
}

// Clock tells the time; tests inject a fake one.
type Clock interface {
	Now() time.Time
}

// SystemClock is the real clock.
type SystemClock struct{}

// Now returns time.Now in UTC.
func (SystemClock) Now() time.Time { return time.Now().UTC() }

// KeyKind is one algorithm the service can hold keys of. Kinds come from a
// registry keyed by name; see Registry.
type KeyKind interface {
	Name() string
	// Operations lists what keys of this kind can do.
	Operations() []Operation
	// Generate makes fresh key material from rand and checks it (pair-wise
	// consistency). It returns the secret to seal and the public key.
	Generate(rand io.Reader) (secret Secret, public []byte, err error)
	// Load parses unsealed material into a private key handle for the
	// operations below. The handle may be cached.
	Load(secret Secret) (PrivateKey, error)
}

// PrivateKey is an opaque, loaded private key of some kind.
type PrivateKey interface{}

// SigningKind is a KeyKind that signs.
type SigningKind interface {
	KeyKind
	Sign(rand io.Reader, priv PrivateKey, msg, context []byte) ([]byte, error)
	Verify(public, msg, context, sig []byte) (bool, error)
}

// KEMKind is a KeyKind that decapsulates.
type KEMKind interface {
	KeyKind
	Decapsulate(priv PrivateKey, ciphertext []byte) (Secret, error)
}

// Registry maps kind names to kinds.
type Registry map[string]KeyKind

// NewRegistry builds a registry from kinds.
func NewRegistry(kinds ...KeyKind) Registry {
	r := Registry{}
	for _, k := range kinds {
		r[k.Name()] = k
	}
	return r
}

// Lookup returns the kind with the name, or an invalid-argument error.
func (r Registry) Lookup(name string) (KeyKind, error) {
	k, ok := r[name]
	if !ok {
		return nil, Errorf(KindInvalid, "unknown key kind: want one of ml-kem-512, ml-kem-768, ml-kem-1024, ml-dsa-44, ml-dsa-65, ml-dsa-87, ckks, bgv")
	}
	return k, nil
}
