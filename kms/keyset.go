package kms

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"slices"
	"time"
)

// KeysetKind is a key kind whose versions carry public evaluation material
// as content-addressed blobs: the homomorphic-encryption kinds. The secret
// is a 32-byte seed, sealed like any other; the public and evaluation keys
// are public material written outside the store.
type KeysetKind interface {
	KeyKind
	// CheckPolicy validates the kind's fields of p (parameters, rotations)
	// and returns p normalized and the size of one keyset in bytes.
	CheckPolicy(p Policy) (Policy, int64, error)
	// GenerateKeyset derives the secret from seed and writes the public and
	// evaluation keys of p as blobs.
	GenerateKeyset(ctx context.Context, seed Secret, p Policy, progress func(done, total int, bytes int64)) (*Keyset, error)
	// RemoveBlobs deletes blobs (those of a generation that did not commit).
	RemoveBlobs(digests []string)
}

// Keyset is what GenerateKeyset made.
type Keyset struct {
	ParamsID        string
	Params          json.RawMessage // Lattigo's parameters JSON
	PublicKey       BlobRef
	Relinearization *BlobRef
	Galois          []GaloisRef
}

// Digests lists every blob of the keyset.
func (k *Keyset) Digests() []string {
	out := []string{k.PublicKey.Digest}
	if k.Relinearization != nil {
		out = append(out, k.Relinearization.Digest)
	}
	for _, g := range k.Galois {
		out = append(out, g.Digest)
	}
	return out
}

func buildManifest(name string, n uint64, kind string, ks *Keyset, at time.Time) ([]byte, error) {
	lit, err := json.Marshal(string(ks.Params))
	if err != nil {
		return nil, err
	}
	m := Manifest{Key: name, Version: n, Kind: kind, ParamsID: ks.ParamsID, Params: lit,
		PublicKey: ks.PublicKey, RelinearizationKey: ks.Relinearization, GaloisKeys: ks.Galois, CreatedAt: at}
	if m.GaloisKeys == nil {
		m.GaloisKeys = []GaloisRef{}
	}
	return json.Marshal(m)
}

// newKeysetVersion makes an HE version: a sealed seed, the keyset's blobs,
// and the manifest signed by the identity key. At most MaxGenerations run
// at once.
func (s *Service) newKeysetVersion(ctx context.Context, name string, kind KeysetKind, n uint64, p Policy) (Version, func(), error) {
	select {
	case s.generations <- struct{}{}:
		defer func() { <-s.generations }()
	default:
		s.counts.genRefused.Add(1)
		return Version{}, nil, Errorf(KindExhausted, "%d HE keyset generation(s) already running; retry later", cap(s.generations))
	}
	seed := make([]byte, 32)
	if _, err := io.ReadFull(s.rand, seed); err != nil {
		return Version{}, nil, Wrap(KindInternal, "seed", err)
	}
	secret := NewSecret(seed)
	defer secret.Wipe()
	// The HSM answers before minutes of work: a failing one is found now.
	if err := s.sealer.Ping(ctx); err != nil {
		return Version{}, nil, asUnavailable("hsm", err)
	}
	ks, err := kind.GenerateKeyset(ctx, secret, p, progressFrom(ctx))
	if err != nil {
		return Version{}, nil, asUnavailable("generate "+kind.Name()+" keyset", err)
	}
	v := Version{Number: n, State: StateEnabled, CreatedAt: s.clock.Now(), Blobs: ks.Digests()}
	if v.Manifest, err = buildManifest(name, n, kind.Name(), ks, v.CreatedAt); err != nil {
		kind.RemoveBlobs(v.Blobs)
		return Version{}, nil, Wrap(KindInternal, "manifest", err)
	}
	if v.ManifestSig, v.ManifestSigBy, err = s.SignAsIdentity(ctx, v.Manifest, []byte(ManifestContext)); err != nil {
		kind.RemoveBlobs(v.Blobs)
		return Version{}, nil, err
	}
	// Sealed last, just before the commit: under the KEK that is primary
	// then (a rotation may have switched it during the generation).
	release := s.seals.enter()
	if v.Sealed, err = s.sealer.Seal(ctx, SealContext{Key: name, Version: n, Kind: kind.Name()}, secret); err != nil {
		release()
		kind.RemoveBlobs(v.Blobs)
		return Version{}, nil, asUnavailable("seal", err)
	}
	return v, release, nil
}

// discard removes what newVersion wrote outside the store for a version
// that did not commit.
func (s *Service) discard(kind KeyKind, v Version) {
	if kk, ok := kind.(KeysetKind); ok && len(v.Blobs) > 0 {
		kk.RemoveBlobs(v.Blobs)
	}
}

// ReferencedBlobs lists every blob a committed version lists (all keys,
// internal ones included), for removing the orphans of a crash at start.
func (s *Service) ReferencedBlobs(ctx context.Context) (map[string]bool, error) {
	out := map[string]bool{}
	err := s.eachKey(ctx, "", func(k *Key) error {
		return s.versionsOf(ctx, k.Name, func(v *Version) error {
			for _, d := range v.Blobs {
				out[d] = true
			}
			return nil
		})
	})
	return out, err
}

// Manifest returns version n's manifest and its signature, if the version is
// usable.
func (s *Service) Manifest(ctx context.Context, name string, n uint64) (*Key, *Version, error) {
	k, v, err := s.PublicKey(ctx, name, n)
	if err != nil {
		return nil, nil, err
	}
	if v.Manifest == nil {
		return nil, nil, Errorf(KindFailedPrecondition, "key %q is of kind %s, which has no evaluation keys", name, k.Kind)
	}
	return k, v, nil
}

// BlobOwner returns the key that lists the blob.
func (s *Service) BlobOwner(ctx context.Context, digest string) (string, error) {
	name, err := s.store.BlobOwner(ctx, digest)
	if errors.Is(err, ErrNotFound) {
		return "", Errorf(KindNotFound, "no such blob")
	}
	if err != nil {
		return "", asUnavailable("store", err)
	}
	return name, nil
}

// BlobListing is how a version's signed manifest or extension lists a
// blob.
type BlobListing struct {
	Ref BlobRef
	// Role is "public", "relinearization", "galois" or "switching".
	Role string
	// Manifest is the listing version's manifest (its parameters).
	Manifest []byte
}

// BlobListing finds the version of key name that lists the blob (newest
// versions first) and how it lists it.
func (s *Service) BlobListing(ctx context.Context, name, digest string) (*BlobListing, error) {
	before := uint64(0)
	for {
		_, vs, next, err := s.listVersions(ctx, name, before, MaxVersionsPage)
		if err != nil {
			return nil, err
		}
		for _, v := range vs {
			if !slices.Contains(v.Blobs, digest) || v.Manifest == nil {
				continue
			}
			var m Manifest
			if err := json.Unmarshal(v.Manifest, &m); err != nil {
				return nil, Wrap(KindInternal, "manifest", err)
			}
			ext, err := extensionOf(v)
			if err != nil {
				return nil, err
			}
			l := &BlobListing{Manifest: v.Manifest}
			switch {
			case m.PublicKey.Digest == digest:
				l.Ref, l.Role = m.PublicKey, "public"
			case m.RelinearizationKey != nil && m.RelinearizationKey.Digest == digest:
				l.Ref, l.Role = *m.RelinearizationKey, "relinearization"
			}
			for _, g := range append(slices.Clone(m.GaloisKeys), ext.GaloisKeys...) {
				if g.Digest == digest {
					l.Ref, l.Role = g.Ref(), "galois"
				}
			}
			for _, x := range ext.SwitchingKeys {
				if x.Digest == digest {
					l.Ref, l.Role = x.Ref(), "switching"
				}
			}
			if l.Role != "" {
				return l, nil
			}
		}
		if next == 0 {
			return nil, Errorf(KindNotFound, "no such blob")
		}
		before = next
	}
}

// DecryptingKind is a keyset kind whose versions decrypt.
type DecryptingKind interface {
	KeysetKind
	// MaxCiphertextSize bounds a ciphertext for the version's parameters.
	MaxCiphertextSize(manifest []byte) (int64, error)
	// ParseCiphertext checks the envelope's ciphertext against the
	// version's parameters (from its manifest) and against the envelope's
	// level, scale and slots; an invalid or foreign one is KindInvalid.
	ParseCiphertext(manifest []byte, env *Envelope) (any, error)
	// LoadSecret derives the version's secret key from its seed.
	LoadSecret(seed Secret, manifest []byte) (PrivateKey, error)
	// NoiseBound returns log2 of a bound on the noise of a ciphertext of
	// the version at level: a fresh public-key encryption (in empty), or
	// the result of an evaluation on inputs whose bounds are in, which
	// multiplies their noise by at most amplification and does keySwitches
	// key switches. Decryption sizes its noise flooding from it.
	NoiseBound(manifest []byte, level int, in []float64, amplification float64, keySwitches int) (float64, error)
	// DecryptPlan decides, from public data only (the parameters, the
	// ciphertext's level and scale, its attested noise bound, the version's
	// budget), whether and how a ciphertext is decrypted: the flooding and
	// the precision left for CKKS (at most logPrecision), correctness for
	// BGV. budget is the effective one (EffectiveDecryptBudget). A refusal
	// is KindInvalid.
	DecryptPlan(manifest []byte, ct any, noiseLog2 float64, budget uint64, logPrecision int) (DecryptPlan, error)
	// Decrypt decrypts a parsed ciphertext as planned: CKKS real parts
	// flooded and rounded, BGV integers.
	Decrypt(priv PrivateKey, manifest []byte, ct any, plan DecryptPlan) (any, error)
}

// DecryptPlan is how a decryption is done.
type DecryptPlan struct {
	// Precision is the bits a CKKS result is rounded to (0 for BGV).
	Precision int
	// FloodSigmaLog2 is log2 of the flooding noise's standard deviation.
	FloodSigmaLog2 float64
	// Queries is the number of decryptions the flooding is sized for.
	Queries float64
}

// DefaultDecryptBudget is how many decryptions a version of an HE key
// answers when its policy sets no decrypt_budget: noise flooding is sized
// for a number of decryptions, and a version answers no more.
const DefaultDecryptBudget = 4096

// EffectiveDecryptBudget is the budget a policy's decrypt_budget means (0:
// DefaultDecryptBudget).
func EffectiveDecryptBudget(b uint64) uint64 {
	if b == 0 {
		return DefaultDecryptBudget
	}
	return b
}

// DefaultDecryptLogPrecision is the rounding of CKKS results when the policy
// sets none.
const DefaultDecryptLogPrecision = 16

// MaxCiphertextSize is the body limit of a decryption with version n.
func (s *Service) MaxCiphertextSize(ctx context.Context, name string, n uint64) (int64, error) {
	k, v, err := s.Manifest(ctx, name, n)
	if err != nil {
		return 0, err
	}
	dk, ok := s.kinds[k.Kind].(DecryptingKind)
	if !ok {
		return 0, Errorf(KindFailedPrecondition, "key %q of kind %s does not decrypt", name, k.Kind)
	}
	return dk.MaxCiphertextSize(v.Manifest)
}

// Decryption is a decryption's result.
type Decryption struct {
	Values    any // []float64 (CKKS) or []uint64 (BGV), the slots in use
	Version   uint64
	Precision int // CKKS: bits kept after flooding
}

// Decrypt decrypts an HE ciphertext with version n. The ciphertext is
// checked and the secret unsealed (or taken from the cache) first; then the
// version's decryption counter is advanced in one transaction with the
// request's audit record (a crash can never let the budget be exceeded);
// then the ciphertext is decrypted.
func (c Call) Decrypt(ctx context.Context, name string, n uint64, env *Envelope) (*Decryption, error) {
	s := c.Service
	d, err := s.checkDecryption(ctx, c.rec, name, n, env, false, true, func(a *Attestation) (*Statement, error) { return s.VerifyAttestation(ctx, a) })
	if err != nil {
		return nil, err
	}
	k, v, dk := d.k, d.v, d.kind
	if rec := c.rec; rec != nil {
		rec.Precision = d.plan.Precision
	}
	priv, ok := s.cache.get(name, v.Number)
	if !ok {
		secret, err := s.sealer.Unseal(ctx, SealContext{Key: name, Version: v.Number, Kind: k.Kind}, v.Sealed)
		if err != nil {
			return nil, asUnavailable("unseal", err)
		}
		priv, err = dk.LoadSecret(secret, v.Manifest)
		secret.Wipe()
		if err != nil {
			return nil, Wrap(KindInternal, "load "+k.Kind, err)
		}
		s.cache.put(name, v.Number, priv)
	}
	// Decrypted first, released only once the budget's increment (and
	// the request's record, status 200) is committed: a decryption that
	// fails spends no budget and is recorded as what it is answered.
	vals, err := dk.Decrypt(priv, v.Manifest, d.parsed, d.plan)
	if err != nil {
		return nil, Wrap(KindInternal, "decrypt", err)
	}
	err = s.update(ctx, name, func(tx KeyTx) ([]*AuditRecord, error) {
		if err := s.spendDecryption(tx, v.Number, d.st, ""); err != nil {
			return nil, err
		}
		return auditFor(c.rec, name, v.Number), nil
	})
	if err != nil {
		return nil, err
	}
	// Only the slots in use.
	switch x := vals.(type) {
	case []float64:
		vals = x[:min(len(x), env.Slots)]
	case []uint64:
		vals = x[:min(len(x), env.Slots)]
	}
	return &Decryption{Values: vals, Version: v.Number, Precision: d.plan.Precision}, nil
}

// checkedDecryption is a decryption that passed its checks.
type checkedDecryption struct {
	k      *Key
	v      *Version
	kind   DecryptingKind
	parsed any
	st     *Statement
	plan   DecryptPlan
}

// checkDecryption runs the checks every decryption makes before a secret
// is touched: the version usable for decryption, the envelope of its
// parameters, the ciphertext's attestation (verify checks its signature:
// this node's identity key, or the coordinating peer's) covering it, its
// sources decryptable, and the plan (flooding, precision). threshold says
// whether the key must be a threshold key (its parties' partial
// decryptions) or must not be (a plain decryption); vouchers checks that
// the tokens that vouched are active (only the node that attested knows
// them). rec notes the attestation.
func (s *Service) checkDecryption(ctx context.Context, rec *AuditRecord, name string, n uint64, env *Envelope, threshold, vouchers bool, verify func(*Attestation) (*Statement, error)) (*checkedDecryption, error) {
	if err := ValidateName(name); err != nil {
		return nil, err
	}
	k, v, kind, err := s.usable(ctx, name, n, OpDecrypt)
	if err != nil {
		return nil, err
	}
	dk, ok := kind.(DecryptingKind)
	if !ok || v.Manifest == nil {
		return nil, Errorf(KindFailedPrecondition, "key %q of kind %s does not decrypt", name, k.Kind)
	}
	switch {
	case threshold && k.Policy.Threshold == nil:
		return nil, Errorf(KindFailedPrecondition, "key %q is not a threshold key", name)
	case !threshold && k.Policy.Threshold != nil:
		return nil, Errorf(KindFailedPrecondition, "key %q is a threshold key: no node holds its secret; decrypt with POST .../threshold-decrypt (the SDK's ThresholdDecrypt), which %d of its parties answer", name, k.Policy.Threshold.T)
	}
	var m Manifest
	if err := json.Unmarshal(v.Manifest, &m); err != nil {
		return nil, Wrap(KindInternal, "manifest", err)
	}
	if err := env.MatchVersion(name, v.Number, m.ParamsID); err != nil {
		return nil, err
	}
	parsed, err := dk.ParseCiphertext(v.Manifest, env)
	if err != nil {
		return nil, err
	}
	// Then provenance: only a ciphertext kmsd attested (an input of a
	// data owner, or an evaluation on attested inputs) is decrypted.
	if env.Attestation == nil {
		if rec != nil {
			rec.AttestedOp = "unattested"
		}
		return nil, Errorf(KindInvalid, "the ciphertext has no attestation: kmsd decrypts only attested inputs (kmsctl he encrypt with an encryptor token) and results an evaluator computed from them (kmsd-mcp), so that a chosen ciphertext cannot turn decryption into a secret-key oracle")
	}
	st, err := verify(env.Attestation)
	if err != nil {
		if rec != nil {
			rec.AttestedOp = "invalid"
		}
		return nil, err
	}
	if err := st.Covers(env); err != nil {
		return nil, err
	}
	noteAttestation(rec, st)
	if vouchers {
		if err := s.vouchersActive(ctx, st); err != nil {
			return nil, err
		}
	}
	if err := sourcesDecryptable(k, st); err != nil {
		return nil, err
	}
	prec := k.Policy.DecryptLogPrecision
	if prec == 0 {
		prec = DefaultDecryptLogPrecision
	}
	plan, err := dk.DecryptPlan(v.Manifest, parsed, st.NoiseLog2, EffectiveDecryptBudget(k.Policy.DecryptBudget), prec)
	if err != nil {
		return nil, err
	}
	return &checkedDecryption{k: k, v: v, kind: dk, parsed: parsed, st: st, plan: plan}, nil
}

// spendDecryption counts one decryption with version n against its
// budget, in tx, and against the budgets of the versions the ciphertext
// was re-keyed from: its noise depends on their secrets, and no secret
// answers more decryptions than the flooding was sized for. at names the
// node in a refusal ("" for a plain decryption).
func (s *Service) spendDecryption(tx KeyTx, n uint64, st *Statement, at string) error {
	k := tx.Key()
	v, err := tx.Version(n)
	if err != nil {
		return err
	}
	if _, err := transition(k, v, ActUse, s.clock.Now()); err != nil {
		return err
	}
	if err := sourcesDecryptable(k, st); err != nil {
		return err
	}
	b := EffectiveDecryptBudget(k.Policy.DecryptBudget)
	if v.Decryptions >= b {
		return Errorf(KindExhausted, "the decryption budget of version %d of key %q (%d) is spent%s: rotate the key and encrypt under the new version", v.Number, k.Name, b, at)
	}
	v.Decryptions++
	for _, src := range st.Sources {
		if src >= v.Number {
			return Errorf(KindInvalid, "the attestation names version %d as a source of a version %d ciphertext", src, v.Number)
		}
		sv, err := tx.Version(src)
		if err != nil {
			return err
		}
		if sv.Decryptions >= b {
			return Errorf(KindExhausted, "the ciphertext was re-keyed from version %d of key %q, whose decryption budget (%d) is spent%s: its secret answers no more decryptions, re-keyed or not", src, k.Name, b, at)
		}
		sv.Decryptions++
	}
	return nil
}

// Decrypt is For(nil).Decrypt.
func (s *Service) Decrypt(ctx context.Context, name string, n uint64, env *Envelope) (*Decryption, error) {
	return s.For(nil).Decrypt(ctx, name, n, env)
}
