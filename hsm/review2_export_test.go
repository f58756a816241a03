package hsm

// BreakForTest marks the connection lost, as a failing operation does.
func (s *Sealer) BreakForTest(err error) { s.broke(err) }
