package kms

import (
	"bytes"
	"context"
	"encoding/json"
	"slices"
	"sync"
)

// Limits of evaluation keys made after a version's generation.
const (
	// DefaultOnDemandGaloisKeys is how many Galois keys a version may gain
	// on demand when its policy sets no on_demand_galois_keys.
	DefaultOnDemandGaloisKeys = 64
	// MaxOnDemandGaloisKeys bounds on_demand_galois_keys.
	MaxOnDemandGaloisKeys = 1024
	// MaxGaloisPerRequest bounds the rotations one request names.
	MaxGaloisPerRequest = 64
	// MaxExtendJobs bounds the background requests for Galois keys
	// running or waiting at once (past it, 429): each holds a goroutine
	// and an operation record before it gets a generation slot.
	MaxExtendJobs = 4
	// maxExtendAttempts bounds how often an extension is merged again
	// after another process changed the version in between.
	maxExtendAttempts = 16
)

// OnDemandLimit is how many Galois keys a version of a key with policy p
// may gain on demand.
func (p Policy) OnDemandLimit() int {
	switch {
	case p.OnDemandGaloisKeys < 0:
		return 0
	case p.OnDemandGaloisKeys == 0:
		return DefaultOnDemandGaloisKeys
	}
	return p.OnDemandGaloisKeys
}

// ExtendingKind is a keyset kind that makes evaluation keys for a version
// after its generation: Galois keys on demand and switching keys from one
// version's secret to a later version's.
type ExtendingKind interface {
	KeysetKind
	// GaloisElements checks rotations (slots to the left; and the
	// conjugation) against the version's parameters (its manifest) and
	// returns their Galois elements, sorted and unique; an invalid one is
	// KindInvalid.
	GaloisElements(manifest []byte, rotations []int, conjugation bool) ([]uint64, error)
	// KeySize is the size of one Galois or switching key's blob for the
	// version's parameters (its full form: a bound on either form).
	KeySize(manifest []byte) (int64, error)
	// GenerateGalois derives the version's secret from seed and writes
	// the Galois keys of galEls as blobs, in galEls' order.
	GenerateGalois(ctx context.Context, seed Secret, manifest []byte, galEls []uint64, progress func(done, total int, bytes int64)) ([]GaloisRef, error)
	// GenerateSwitching writes, as a blob, the switching key from the
	// secret of from (a version with manifest fromManifest) to the secret
	// of to (toManifest): same parameters, or KindInvalid.
	GenerateSwitching(ctx context.Context, from Secret, fromManifest []byte, to Secret, toManifest []byte) (BlobRef, error)
}

// ExtendResult is what an evaluation-key request got.
type ExtendResult struct {
	// Galois are the asked keys' references, by Galois element.
	Galois []GaloisRef
	// Switching is the asked switching key (SwitchingKey only).
	Switching *SwitchingRef
	// Version is the version the keys are of.
	Version uint64
	// Generated is how many keys this request made (0: all were there).
	Generated int
	// Sequence is the extension that lists the keys the manifest does not
	// (0: the manifest lists them all).
	Sequence uint64
}

// versionLocks serializes the extensions of one version within a process
// (other processes are caught by the commit's check).
type versionLocks struct {
	mu sync.Mutex
	m  map[VersionRef]chan struct{}
}

func (l *versionLocks) lock(ctx context.Context, ref VersionRef) (func(), error) {
	l.mu.Lock()
	if l.m == nil {
		l.m = map[VersionRef]chan struct{}{}
	}
	ch := l.m[ref]
	if ch == nil {
		ch = make(chan struct{}, 1)
		l.m[ref] = ch
	}
	l.mu.Unlock()
	select {
	case ch <- struct{}{}:
		return func() { <-ch }, nil
	case <-ctx.Done():
		return nil, Wrap(KindUnavailable, "wait for another request extending the version", ctx.Err())
	}
}

// extensionSlot waits for one of the slots of key generations for existing
// versions (Config.MaxGenerations of them) until ctx ends.
func (s *Service) extensionSlot(ctx context.Context) (func(), error) {
	select {
	case s.extensions <- struct{}{}:
		return func() { <-s.extensions }, nil
	case <-ctx.Done():
		return nil, Wrap(KindUnavailable, "wait for a generation slot", ctx.Err())
	}
}

// extension decodes a version's extension (an empty one if none).
func extensionOf(v *Version) (*ManifestExtension, error) {
	e := &ManifestExtension{}
	if v.Extension == nil {
		return e, nil
	}
	if err := json.Unmarshal(v.Extension, e); err != nil {
		return nil, Wrap(KindInternal, "manifest extension", err)
	}
	return e, nil
}

// Extension returns version n (0: primary) of an HE key, whose Extension
// is nil when kmsd made no key for it after its manifest.
func (s *Service) Extension(ctx context.Context, name string, n uint64) (*Version, error) {
	_, v, err := s.Manifest(ctx, name, n)
	return v, err
}

// extendable resolves an HE version that may gain keys: usable, of a kind
// that extends.
func (s *Service) extendable(ctx context.Context, name string, n uint64) (*Key, *Version, ExtendingKind, error) {
	if err := ValidateName(name); err != nil {
		return nil, nil, nil, err
	}
	k, v, err := s.Manifest(ctx, name, n)
	if err != nil {
		return nil, nil, nil, err
	}
	ek, ok := s.kinds[k.Kind].(ExtendingKind)
	if !ok {
		return nil, nil, nil, Errorf(KindFailedPrecondition, "key %q of kind %s has no evaluation keys to extend", name, k.Kind)
	}
	if k.Policy.Threshold != nil {
		return nil, nil, nil, Errorf(KindFailedPrecondition, "key %q is a threshold key: its evaluation keys are made jointly by its parties, with the policy's rotations (no Galois key on demand, no switching key)", name)
	}
	return k, v, ek, nil
}

// galoisPresent maps the Galois elements the version's manifest and
// extension list to their references.
func galoisPresent(v *Version, ext *ManifestExtension) (map[uint64]GaloisRef, error) {
	var m Manifest
	if err := json.Unmarshal(v.Manifest, &m); err != nil {
		return nil, Wrap(KindInternal, "manifest", err)
	}
	out := map[uint64]GaloisRef{}
	for _, g := range m.GaloisKeys {
		out[g.GaloisElement] = g
	}
	for _, g := range ext.GaloisKeys {
		out[g.GaloisElement] = g
	}
	return out, nil
}

// GaloisKeys makes sure version n (0: primary) of key name has the Galois
// keys of rotations (and of the conjugation): those its manifest or
// extension lists are reused; the others are generated from the version's
// secret (unsealed for it; the keys are public and sealed nowhere),
// stored as blobs and listed in a new signed extension, committed with the
// request's audit record. A request whose new keys are larger than the
// async threshold runs in the background (a Job; bg and bgRec as for
// CreateKeyAsync).
func (c Call) GaloisKeys(ctx, bg context.Context, bgRec *AuditRecord, name string, n uint64, rotations []int, conjugation bool) (*ExtendResult, *Job, error) {
	s := c.Service
	k, v, ek, err := s.extendable(ctx, name, n)
	if err != nil {
		return nil, nil, err
	}
	asked := len(rotations)
	if conjugation {
		asked++
	}
	if asked == 0 {
		return nil, nil, Errorf(KindInvalid, "name at least one rotation, or the conjugation")
	}
	if asked > MaxGaloisPerRequest {
		return nil, nil, Errorf(KindInvalid, "a request names at most %d Galois keys; it named %d", MaxGaloisPerRequest, asked)
	}
	els, err := ek.GaloisElements(v.Manifest, rotations, conjugation)
	if err != nil {
		return nil, nil, err
	}
	missing, err := s.missingGalois(k, v, ek, els)
	if err != nil {
		return nil, nil, err
	}
	if len(missing) == 0 {
		res, err := galoisResult(v, els, 0)
		return res, nil, err
	}
	size, err := ek.KeySize(v.Manifest)
	if err != nil {
		return nil, nil, Wrap(KindInternal, "key size", err)
	}
	if int64(len(missing))*size <= s.asyncBytes {
		res, err := s.addGalois(ctx, c.rec, k.Name, v.Number, ek, els)
		return res, nil, err
	}
	if s.extendJobs.Add(1) > MaxExtendJobs {
		s.extendJobs.Add(-1)
		return nil, nil, Errorf(KindExhausted, "%d evaluation-key generations already run in the background; retry later", MaxExtendJobs)
	}
	j := s.newJob(k.Name)
	go func() {
		defer s.extendJobs.Add(-1)
		_, err := s.addGalois(context.WithValue(bg, progressKey{}, s.jobProgress(j)), bgRec, k.Name, v.Number, ek, els)
		s.finishJob(j, v.Number, err)
	}()
	cp := *j
	cp.Version = v.Number
	return nil, &cp, nil
}

// missingGalois returns the elements of els the version lacks, refusing
// them if they would take it past its limits.
func (s *Service) missingGalois(k *Key, v *Version, ek ExtendingKind, els []uint64) ([]uint64, error) {
	ext, err := extensionOf(v)
	if err != nil {
		return nil, err
	}
	present, err := galoisPresent(v, ext)
	if err != nil {
		return nil, err
	}
	var missing []uint64
	for _, e := range els {
		if _, ok := present[e]; !ok {
			missing = append(missing, e)
		}
	}
	if len(missing) == 0 {
		return nil, nil
	}
	if limit := k.Policy.OnDemandLimit(); len(ext.GaloisKeys)+len(missing) > limit {
		return nil, Errorf(KindFailedPrecondition, "version %d of key %q has %d Galois keys made on demand and this request needs %d more, past the key's limit of %d (policy on_demand_galois_keys): list the rotations in the policy's rotations for the next version, or raise the limit", v.Number, k.Name, len(ext.GaloisKeys), len(missing), limit)
	}
	size, err := ek.KeySize(v.Manifest)
	if err != nil {
		return nil, Wrap(KindInternal, "key size", err)
	}
	// A bound: no key of a version is larger than a Galois key.
	if total := int64(len(v.Blobs)) * size; total+int64(len(missing))*size > s.maxKeyset {
		return nil, Errorf(KindTooLarge, "version %d of key %q would hold more than %d MiB of keys", v.Number, k.Name, s.maxKeyset>>20)
	}
	return missing, nil
}

// galoisResult lists the references of els from the version's manifest
// and extension.
func galoisResult(v *Version, els []uint64, generated int) (*ExtendResult, error) {
	ext, err := extensionOf(v)
	if err != nil {
		return nil, err
	}
	present, err := galoisPresent(v, ext)
	if err != nil {
		return nil, err
	}
	res := &ExtendResult{Version: v.Number, Generated: generated}
	inExt := map[uint64]bool{}
	for _, g := range ext.GaloisKeys {
		inExt[g.GaloisElement] = true
	}
	for _, e := range els {
		g, ok := present[e]
		if !ok {
			return nil, Errorf(KindInternal, "galois element %d missing after its generation", e)
		}
		if inExt[e] {
			res.Sequence = ext.Sequence
		}
		res.Galois = append(res.Galois, g)
	}
	return res, nil
}

// addGalois generates the keys of els the version still lacks (checked
// again under the version's lock) and commits them in a new extension.
func (s *Service) addGalois(ctx context.Context, rec *AuditRecord, name string, n uint64, ek ExtendingKind, els []uint64) (*ExtendResult, error) {
	unlock, err := s.extendLocks.lock(ctx, VersionRef{name, n})
	if err != nil {
		return nil, err
	}
	defer unlock()
	k, v, err := s.Manifest(ctx, name, n)
	if err != nil {
		return nil, err
	}
	missing, err := s.missingGalois(k, v, ek, els)
	if err != nil {
		return nil, err
	}
	if len(missing) == 0 {
		return galoisResult(v, els, 0)
	}
	release, err := s.extensionSlot(ctx)
	if err != nil {
		return nil, err
	}
	defer release()
	secret, err := s.sealer.Unseal(ctx, SealContext{Key: name, Version: v.Number, Kind: k.Kind}, v.Sealed)
	if err != nil {
		return nil, asUnavailable("unseal", err)
	}
	refs, err := ek.GenerateGalois(ctx, secret, v.Manifest, missing, progressFrom(ctx))
	secret.Wipe()
	if err != nil {
		return nil, asUnavailable("generate galois keys", err)
	}
	var digests []string
	for _, r := range refs {
		digests = append(digests, r.Digest)
	}
	v, err = s.commitExtension(ctx, rec, ek, name, n, digests, func(ext *ManifestExtension) {
		have := map[uint64]bool{}
		for _, g := range ext.GaloisKeys {
			have[g.GaloisElement] = true
		}
		for _, r := range refs {
			if !have[r.GaloisElement] {
				ext.GaloisKeys = append(ext.GaloisKeys, r)
			}
		}
		slices.SortFunc(ext.GaloisKeys, func(a, b GaloisRef) int {
			switch {
			case a.GaloisElement < b.GaloisElement:
				return -1
			case a.GaloisElement > b.GaloisElement:
				return 1
			}
			return 0
		})
	}, nil)
	if err != nil {
		ek.RemoveBlobs(digests)
		return nil, err
	}
	return galoisResult(v, els, len(refs))
}

// commitExtension commits a new extension of version n: change edits a
// copy of the current one (the keys it adds are listed in digests); the
// result is signed and committed with rec, unless another process
// changed the version's extension in between, when it starts over. Blobs
// of digests the committed extension does not list (another process
// added the same key first) are removed. It returns the committed
// version.
//
// check, when set, runs in the commit's transaction too: what else must
// still hold for the change (a switching key's target still enabled).
func (s *Service) commitExtension(ctx context.Context, rec *AuditRecord, kind KeysetKind, name string, n uint64, digests []string, change func(*ManifestExtension), check func(KeyTx) error) (*Version, error) {
	for attempt := 0; ; attempt++ {
		_, v, err := s.resolve(ctx, name, n)
		if err != nil {
			return nil, err
		}
		ext, err := extensionOf(v)
		if err != nil {
			return nil, err
		}
		base := v.Extension
		var m Manifest
		if err := json.Unmarshal(v.Manifest, &m); err != nil {
			return nil, Wrap(KindInternal, "manifest", err)
		}
		ext.Key, ext.Version, ext.ParamsID = name, n, m.ParamsID
		ext.Sequence++
		ext.CreatedAt = s.clock.Now()
		change(ext)
		if ext.GaloisKeys == nil {
			ext.GaloisKeys = []GaloisRef{}
		}
		if ext.SwitchingKeys == nil {
			ext.SwitchingKeys = []SwitchingRef{}
		}
		listed := map[string]bool{}
		for _, b := range ext.Blobs() {
			listed[b.Digest] = true
		}
		doc, err := json.Marshal(ext)
		if err != nil {
			return nil, Wrap(KindInternal, "manifest extension", err)
		}
		sig, by, err := s.SignAsIdentity(ctx, doc, []byte(ExtensionContext))
		if err != nil {
			return nil, err
		}
		raced := false
		var out *Version
		err = s.update(ctx, name, func(tx KeyTx) ([]*AuditRecord, error) {
			k := tx.Key()
			tv, err := tx.Version(n)
			if err != nil {
				return nil, err
			}
			if _, err := transition(k, tv, ActUse, s.clock.Now()); err != nil {
				return nil, err
			}
			if check != nil {
				if err := check(tx); err != nil {
					return nil, err
				}
			}
			if !bytes.Equal(tv.Extension, base) {
				raced = true
				return nil, Errorf(KindFailedPrecondition, "the extension of version %d of key %q changed; retry", n, name)
			}
			tv.Extension, tv.ExtensionSig, tv.ExtensionSigBy = doc, sig, by
			for _, d := range digests {
				if listed[d] && !slices.Contains(tv.Blobs, d) {
					tv.Blobs = append(tv.Blobs, d)
				}
			}
			out = tv.Clone()
			return auditFor(rec, name, n), nil
		})
		if raced && attempt < maxExtendAttempts && ctx.Err() == nil {
			continue
		}
		if err != nil {
			kind.RemoveBlobs(digests)
			return nil, err
		}
		var unused []string
		for _, d := range digests {
			if !listed[d] {
				unused = append(unused, d)
			}
		}
		if len(unused) > 0 {
			kind.RemoveBlobs(unused)
		}
		return out, nil
	}
}

// SwitchingKey (an administrator's decision: PermManageKey) makes sure
// version from of key name has a switching key
// from its secret to that of version to, a later enabled version of the
// same parameters: a Lattigo evaluation key that re-keys a ciphertext of
// version from into one of version to without decrypting it. It is
// generated from both secrets (unsealed for it) the first time, stored as
// a blob owned by version from (destroyed with it) and listed in from's
// signed extension. Versions below the key's min_decryption_version get
// none: their ciphertexts are meant to stay undecryptable.
func (c Call) SwitchingKey(ctx context.Context, name string, from, to uint64) (*ExtendResult, error) {
	s := c.Service
	k, vf, ek, err := s.extendable(ctx, name, from)
	if err != nil {
		return nil, err
	}
	if to <= vf.Number {
		return nil, Errorf(KindInvalid, "a switching key goes from a version to a later one: %d is not after %d", to, vf.Number)
	}
	if vf.Number < k.MinDecryptionVersion {
		return nil, Errorf(KindFailedPrecondition, "version %d of key %q is below its min_decryption_version (%d): its ciphertexts are not to be decrypted, nor re-keyed", vf.Number, name, k.MinDecryptionVersion)
	}
	_, vt, err := s.Manifest(ctx, name, to)
	if err != nil {
		return nil, err
	}
	if vt.State != StateEnabled {
		return nil, Errorf(KindFailedPrecondition, "version %d of key %q is %s: ciphertexts are re-keyed only towards an enabled version", to, name, vt.State)
	}
	if res, ok, err := switchingResult(vf, to); ok || err != nil {
		return res, err
	}
	size, err := ek.KeySize(vf.Manifest)
	if err != nil {
		return nil, Wrap(KindInternal, "key size", err)
	}
	if int64(len(vf.Blobs)+1)*size > s.maxKeyset {
		return nil, Errorf(KindTooLarge, "version %d of key %q would hold more than %d MiB of keys", vf.Number, name, s.maxKeyset>>20)
	}
	unlock, err := s.extendLocks.lock(ctx, VersionRef{name, vf.Number})
	if err != nil {
		return nil, err
	}
	defer unlock()
	if _, vf, err = s.Manifest(ctx, name, vf.Number); err != nil {
		return nil, err
	}
	if res, ok, err := switchingResult(vf, to); ok || err != nil {
		return res, err
	}
	// Again under the lock: a request that held it may have added a key
	// since the check above.
	if int64(len(vf.Blobs)+1)*size > s.maxKeyset {
		return nil, Errorf(KindTooLarge, "version %d of key %q would hold more than %d MiB of keys", vf.Number, name, s.maxKeyset>>20)
	}
	release, err := s.extensionSlot(ctx)
	if err != nil {
		return nil, err
	}
	defer release()
	fromSecret, err := s.sealer.Unseal(ctx, SealContext{Key: name, Version: vf.Number, Kind: k.Kind}, vf.Sealed)
	if err != nil {
		return nil, asUnavailable("unseal", err)
	}
	defer fromSecret.Wipe()
	toSecret, err := s.sealer.Unseal(ctx, SealContext{Key: name, Version: vt.Number, Kind: k.Kind}, vt.Sealed)
	if err != nil {
		return nil, asUnavailable("unseal", err)
	}
	defer toSecret.Wipe()
	ref, err := ek.GenerateSwitching(ctx, fromSecret, vf.Manifest, toSecret, vt.Manifest)
	if err != nil {
		if KindOf(err) == KindInvalid {
			return nil, err
		}
		return nil, asUnavailable("generate switching key", err)
	}
	sr := SwitchingRef{ToVersion: to, Digest: ref.Digest, Size: ref.Size, Form: ref.Form, FullDigest: ref.FullDigest, FullSize: ref.FullSize}
	v, err := s.commitExtension(ctx, c.rec, ek, name, vf.Number, []string{ref.Digest}, func(ext *ManifestExtension) {
		for _, x := range ext.SwitchingKeys {
			if x.ToVersion == to {
				return
			}
		}
		ext.SwitchingKeys = append(ext.SwitchingKeys, sr)
	}, func(tx KeyTx) error {
		// The target may have been disabled, scheduled for destruction
		// or destroyed while the key was made.
		tvt, err := tx.Version(to)
		if err != nil {
			return err
		}
		if tvt.State != StateEnabled {
			return Errorf(KindFailedPrecondition, "version %d of key %q is %s: ciphertexts are re-keyed only towards an enabled version", to, name, tvt.State)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	res, _, err := switchingResult(v, to)
	if res != nil {
		res.Generated = 1
	}
	return res, err
}

// switchingResult finds the switching key to version to in v's extension.
func switchingResult(v *Version, to uint64) (*ExtendResult, bool, error) {
	ext, err := extensionOf(v)
	if err != nil {
		return nil, false, err
	}
	for _, x := range ext.SwitchingKeys {
		if x.ToVersion == to {
			x := x
			return &ExtendResult{Version: v.Number, Switching: &x, Sequence: ext.Sequence}, true, nil
		}
	}
	return nil, false, nil
}
