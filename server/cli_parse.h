// Boost.Program_options plumbing shared by the subcommands.
#pragma once

#include <boost/program_options.hpp>
#include <string>
#include <vector>

namespace cbt::cli {

// The options in command-line order, repeated ones included (for
// subcommands where order matters), without storing them. The result points
// into `all`, which must outlive it. Throws po::error.
boost::program_options::parsed_options ParseOnly(
    const std::vector<std::string>& args, const boost::program_options::options_description& all,
    const boost::program_options::positional_options_description& positional);

// Parses args against visible + hidden options (hidden: the positionals),
// stores them in vm and notifies. Long options must be spelt out (no
// prefix guessing: "--dis" is an error, not "--disable"). Throws po::error.
void ParseCommandLine(const std::vector<std::string>& args,
                      const boost::program_options::options_description& visible,
                      const boost::program_options::options_description& hidden,
                      const boost::program_options::positional_options_description& positional,
                      boost::program_options::variables_map& vm);

}  // namespace cbt::cli
